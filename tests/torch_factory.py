"""A user's own PyTorch network for ``--model-factory tests.torch_factory:build`` (server and
devices): not one of FedHub's, so a federation of it proves the factory path end to end."""

from __future__ import annotations

from torch import nn


class TinyColourNet(nn.Module):
    """A small CNN for CIFAR-10's 32x32 colour images; ``mean``/``std`` ask FedHub to normalise."""

    mean = 0.5
    std = 0.25

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def build() -> nn.Module:
    return TinyColourNet()


def not_a_module() -> object:
    return "a string"
