"""``--model-factory`` targets that a careless user might write, for tests/test_torch_hostile.py:
each must stop the server with one ``error:`` line and exit 2, never a traceback."""

from __future__ import annotations

import sys

from torch import nn

NOT_CALLABLE = 3


def raises() -> nn.Module:
    raise RuntimeError("the user's factory is broken")


def needs_arguments(width: int) -> nn.Module:
    return nn.Linear(width, 10)


def exits() -> nn.Module:
    sys.exit(0)


class _NoParameters(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * 0.0


def no_parameters() -> nn.Module:
    return _NoParameters()
