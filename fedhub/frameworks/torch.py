"""The PyTorch side of the framework seam: FedHub's networks as ``torch.nn.Module``s.

Networks by name: ``cifar`` is the CIFAR-Flower seed's CNN (the PyTorch tutorial's: two
convolutions, three fully connected layers, inputs normalised with mean and std 0.5) for
CIFAR-10; ``basic`` and ``cnn`` mirror the Keras networks of ``keras_model.py`` layer for layer
(same shapes, raw 0..1 inputs) for Fashion-MNIST. Weights are named by ``state_dict`` key
(``conv1.weight``, ...), in the module's order.

Importing this module imports torch and never TensorFlow.
"""

from __future__ import annotations

import copy
import io
import json
import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as safetensors_bytes
from torch import nn

from fedhub import datasets
from fedhub.engine.files import atomic_path
from fedhub.frameworks.base import (
    Progress,
    Weights,
    check_labels,
    classification_metrics,
    scale_images,
    softmax,
)

# torch.export traces with process-wide state: two exports at once (two servers in one process,
# each ending its run in its MLflow hook) fail with "... is not tracked with proxy".
_EXPORTING = threading.Lock()

NAME = "torch"
EXPORT_SUFFIX = ".pt2"
# The exported program says what it is in this extra file (JSON).
ABOUT_IN_EXPORT = "fedhub.json"
_EVAL_BATCH = 1024


class CifarNet(nn.Module):
    """The seed's network, the PyTorch tutorial CNN for 32x32 colour images."""

    mean = 0.5
    std = 0.5

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class BasicNet(nn.Module):
    """Keras ``basic``: flatten, dense 128 relu (``hidden``), dense 10 logits (``logits``)."""

    mean = 0.0
    std = 1.0

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(28 * 28, 128)
        self.logits = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(torch.relu(self.hidden(torch.flatten(x, 1))))


class ConvNet(nn.Module):
    """Keras ``cnn``: conv 32 3x3, pool, conv 64 3x3, pool, dense 128, dense 10 (28 -> 26 -> 13 ->
    11 -> 5, so 5·5·64 = 1600 inputs to ``hidden``, as in Keras)."""

    mean = 0.0
    std = 1.0

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.pool = nn.MaxPool2d(2)
        self.hidden = nn.Linear(5 * 5 * 64, 128)
        self.logits = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.logits(torch.relu(self.hidden(torch.flatten(x, 1))))


# network name -> (module class, the data set whose images it takes)
_NETWORKS: dict[str, tuple[type[nn.Module], str]] = {
    "cifar": (CifarNet, "cifar-10"),
    "basic": (BasicNet, "fashion-mnist"),
    "cnn": (ConvNet, "fashion-mnist"),
}
NETWORKS: dict[str, str] = {name: dataset for name, (_, dataset) in _NETWORKS.items()}


class RawImages(nn.Module):
    """A network as plain PyTorch users get it (the export): raw uint8 images ``(N, H, W)`` or
    ``(N, H, W, C)`` in, softmax probabilities out; scaling and normalisation inside, the same
    as :meth:`TorchNetwork.to_tensor`."""

    def __init__(self, net: nn.Module, mean: float, std: float, grey: bool) -> None:
        super().__init__()
        self.net = net
        self.mean = mean
        self.std = std
        self.grey = grey

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0
        x = x.unsqueeze(1) if self.grey else x.permute(0, 3, 1, 2)
        x = (x - self.mean) / self.std
        return torch.softmax(self.net(x), dim=-1)


class TorchNetwork:
    """One of FedHub's PyTorch networks, implementing :class:`fedhub.frameworks.base.Network`.

    The optimizer (Adam, as the Keras networks use) is kept from round to round, like Keras
    keeps its compiled optimizer; its learning rate is the task's.
    """

    framework = NAME
    export_suffix = EXPORT_SUFFIX

    def __init__(self, name: str, *, seed: int | None = 0, module: nn.Module | None = None,
                 dataset: str | None = None, factory: str | None = None) -> None:
        """FedHub's network ``name``; or, with ``module`` (built by the user's ``factory``), that
        module on ``dataset``'s images (see :meth:`TorchFramework.from_factory`)."""
        if module is None:
            if name not in _NETWORKS:
                raise ValueError(f"unknown PyTorch network {name!r}; choose one of {', '.join(_NETWORKS)}")
            cls, dataset = _NETWORKS[name]
        elif dataset is None:
            raise ValueError("a module of your own needs the data set whose images it takes")
        spec = datasets.get(dataset)
        self.name = name
        self.dataset = dataset
        self.factory = factory  # "module:function" for the user's own module, else None
        self.image_shape: tuple[int, ...] = spec.image_shape
        self.class_names: tuple[str, ...] = spec.class_names
        if seed is not None:
            torch.manual_seed(seed)
        self.module: nn.Module = module if module is not None else cls(len(spec.class_names))
        # The input normalisation: the module's own ``mean`` and ``std`` where it has them (the
        # seed's CIFAR-10 CNN: 0.5 and 0.5), else none (images scaled to 0..1).
        self.mean = float(getattr(self.module, "mean", 0.0))
        self.std = float(getattr(self.module, "std", 1.0))
        # A GPU where this process sees one (a pool's worker sees those --gpus-per-worker gave it)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module.to(self.device)
        self.module.eval()
        self._rng = np.random.default_rng(seed)
        self._optimizer: torch.optim.Optimizer | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TorchNetwork({self.name!r})"

    # ------------------------------------------------------------------ inputs

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """Raw images as the module's float32 NCHW input, normalised as it was trained."""
        scaled = scale_images(images, self.image_shape)
        x = torch.from_numpy(scaled)
        x = x.unsqueeze(1) if len(self.image_shape) == 2 else x.permute(0, 3, 1, 2)
        return ((x.to(self.device) - self.mean) / self.std).contiguous()

    def image_to_input(self, source: bytes) -> np.ndarray:
        from fedhub.frameworks.images import colour_image_to_array, image_to_array

        if len(self.image_shape) == 3:
            return colour_image_to_array(source, self.image_shape[0])
        return image_to_array(source)

    # ------------------------------------------------------------------ weights

    def get_weights(self) -> Weights:
        return {name: t.detach().cpu().numpy().astype(np.float32, copy=True)
                for name, t in self.module.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
        state = self.module.state_dict()
        missing = [name for name in state if name not in weights]
        if missing:
            raise ValueError(f"missing weight tensor {missing[0]!r}")
        extra = [name for name in weights if name not in state]
        if extra:
            raise ValueError(f"unexpected weight tensor {extra[0]!r} (not in model {self.name!r})")
        prepared = {}
        for name, current in state.items():
            value = np.asarray(weights[name])
            if value.shape != tuple(current.shape):
                raise ValueError(f"weight tensor {name!r} has shape {value.shape}, "
                                 f"expected {tuple(current.shape)}")
            if value.dtype.kind not in "uif":
                raise ValueError(f"weight tensor {name!r} has non-numeric dtype {value.dtype}")
            cast = value.astype(np.float32)
            if not np.isfinite(cast).all():
                raise ValueError(f"weight tensor {name!r} contains NaN or infinite values")
            prepared[name] = torch.from_numpy(np.ascontiguousarray(cast))
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(prepared[name])

    # ------------------------------------------------------------------ training

    def reset_optimizer(self) -> None:
        """Forget the optimizer's state (Adam's moments, its step count): the next :meth:`train`
        starts afresh, as a new device process would. The pool's workers share one network
        among many devices, and one device's moments must not steer another's steps."""
        self._optimizer = None

    def train(self, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch_size: int = 32,
              learning_rate: float = 1e-3, proximal_mu: float = 0.0,
              anchor: Mapping[str, np.ndarray] | None = None,
              stop: threading.Event | None = None, progress: Progress | None = None) -> dict[str, float]:
        from fedhub.device.trainer import TrainingInterrupted

        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        n = len(x)
        if n == 0:
            raise ValueError("cannot train on an empty dataset")
        labels = torch.from_numpy(check_labels(y, n, len(self.class_names))).to(self.device)
        scale_images(x[:1], self.image_shape)  # a wrong shape or dtype fails before any step
        module = self.module
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
        for group in self._optimizer.param_groups:
            group["lr"] = float(learning_rate)
        anchors = None
        if proximal_mu > 0:
            anchors = ([p.detach().clone() for p in module.parameters()] if anchor is None else
                       [torch.as_tensor(np.asarray(anchor[name], dtype=np.float32), device=self.device)
                        for name, _ in module.named_parameters()])
        loss_fn = nn.CrossEntropyLoss()
        per_epoch = math.ceil(n / batch_size)
        total, done = epochs * per_epoch, 0
        if progress is not None:
            progress(0, total)
        loss_sum = correct = seen = 0.0
        module.train()
        try:
            for _ in range(epochs):
                order = self._rng.permutation(n)
                loss_sum = correct = seen = 0.0
                for start in range(0, n, batch_size):
                    if stop is not None and stop.is_set():
                        raise TrainingInterrupted(done, total)
                    index = order[start : start + batch_size]
                    inputs, target = self.to_tensor(x[index]), labels[index]
                    self._optimizer.zero_grad(set_to_none=True)
                    logits = module(inputs)
                    loss = loss_fn(logits, target)
                    if anchors is not None:
                        loss = loss + _proximal(module, anchors, proximal_mu)
                    loss.backward()
                    self._optimizer.step()
                    size = len(index)
                    loss_sum += float(loss.detach()) * size
                    correct += float((logits.detach().argmax(1) == target).sum())
                    seen += size
                    done += 1
                    if progress is not None:
                        progress(done, total)
            if stop is not None and stop.is_set():
                raise TrainingInterrupted(done, total)
        finally:
            module.eval()
            if stop is not None:
                stop.clear()  # as the Keras trainer: an interrupt counts for this call only
        return {"loss": loss_sum / seen, "accuracy": correct / seen}

    # ------------------------------------------------------------------ inference

    def _logits(self, x: np.ndarray) -> np.ndarray:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(x), _EVAL_BATCH):
                chunks.append(self.module(self.to_tensor(x[start : start + _EVAL_BATCH])).cpu().numpy())
        if not chunks:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(chunks)

    def predict(self, x: np.ndarray) -> np.ndarray:
        arr = np.asarray(x)
        if arr.shape == self.image_shape or (len(self.image_shape) == 2
                                             and arr.shape == (*self.image_shape, 1)):
            arr = arr[np.newaxis]
        return softmax(self._logits(arr))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return self.evaluate_parts(x, y, [len(x)])[0]

    def evaluate_parts(self, x: np.ndarray, y: np.ndarray, sizes: Sequence[int]) -> list[dict[str, Any]]:
        n = len(x)
        if n == 0 or not all(sizes):
            raise ValueError("cannot evaluate on an empty dataset")
        labels = check_labels(y, n, len(self.class_names))
        logits = torch.from_numpy(self._logits(x))
        targets = torch.from_numpy(labels)
        results, start = [], 0
        for size in sizes:
            part = slice(start, start + size)
            start += size
            loss = float(nn.functional.cross_entropy(logits[part], targets[part]))
            results.append(classification_metrics(logits[part].numpy(), labels[part], loss))
        return results

    # ------------------------------------------------------------------ export

    def raw_image_module(self) -> nn.Module:
        """The network wrapped for plain PyTorch users (see :class:`RawImages`), on the CPU."""
        module = self.module if self.device.type == "cpu" else copy.deepcopy(self.module).cpu()
        return RawImages(module, self.mean, self.std, grey=len(self.image_shape) == 2).eval()

    def export(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """A ``torch.export`` program (``torch.export.load(f).module()``): raw uint8 images in,
        probabilities out, any batch size. ``extra_files={"fedhub.json": ""}`` on load gives the
        framework, network and class names. The same weights as safetensors, named by
        ``state_dict`` key, are the server's round checkpoints (``GET /api/model``), and
        :meth:`save` writes them beside the program."""
        with self._lock, _EXPORTING:
            self.set_weights(weights)
            wrapped = self.raw_image_module()
            example = torch.zeros((2, *self.image_shape), dtype=torch.uint8)
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
            about = json.dumps({"framework": NAME, "network": self.name, "dataset": self.dataset,
                                "class_names": list(self.class_names),
                                "input": f"uint8 (N, {', '.join(map(str, self.image_shape))})",
                                "output": "softmax probabilities (N, classes)"})
            buffer = io.BytesIO()
            torch.export.save(program, buffer, extra_files={ABOUT_IN_EXPORT: about})
            return buffer.getvalue()

    def save(self, weights: Mapping[str, np.ndarray], folder: Path) -> Path:
        """``folder/final.pt2`` (:meth:`export`) and ``folder/final.safetensors`` beside it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"final{EXPORT_SUFFIX}"
        data = self.export(weights)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
        with atomic_path(folder / "final.safetensors") as tmp:
            Path(tmp).write_bytes(safetensors_bytes(self.get_weights()))
        return path


def _proximal(module: nn.Module, anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's ``(mu/2)·||w - w_global||²`` over the trainable parameters."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchors, strict=True))


class TorchFramework:
    """:class:`fedhub.frameworks.base.Framework` for PyTorch."""

    name = NAME
    networks = NETWORKS

    def build(self, name: str, *, seed: int | None = 0) -> TorchNetwork:
        return TorchNetwork(name, seed=seed)

    def from_factory(self, spec: str, *, dataset: str, seed: int | None = 0) -> TorchNetwork:
        """The user's own network: ``module:function`` (``--model-factory``) called with no
        arguments must return an ``nn.Module`` taking ``dataset``'s images as a float32 NCHW
        batch scaled to 0..1 (normalised by the module's ``mean`` and ``std`` attributes when
        it has them) and answering one logit per class. It then trains, evaluates, predicts and
        exports like FedHub's own networks; its weights are its ``state_dict``, by key. The
        function is imported from the local installation, named by the user on this machine,
        never by the server. ValueError (one line) when it cannot be loaded or is no module."""
        from fedhub.global_model import call_factory, resolve

        resolve(spec, "--model-factory")  # import first: the seed below is for the call alone
        if seed is not None:
            torch.manual_seed(seed)  # the same initial weights on every machine
        module = call_factory(spec, "--model-factory")
        if not isinstance(module, nn.Module):
            raise ValueError(f"--model-factory {spec!r} returned {type(module).__name__}, "
                             "not a torch.nn.Module")
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"--model-factory {spec!r} returned a module with no trainable "
                             "parameters: there is nothing for the federation to learn")
        network = TorchNetwork(spec, seed=None, module=module, dataset=dataset, factory=spec)
        classes = len(network.class_names)
        example = network.to_tensor(np.zeros((1, *network.image_shape), np.uint8))
        try:
            with torch.inference_mode():
                out = module(example)
        except Exception as exc:  # the user's forward(): any failure is theirs to see, in one line
            raise ValueError(f"--model-factory {spec!r}: the module cannot take one {dataset} image "
                             f"(float32 {tuple(example.shape)}): {type(exc).__name__}: {exc}") from None
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if shape != (1, classes):
            raise ValueError(f"--model-factory {spec!r}: the module answers {shape} for one {dataset} "
                             f"image; expected (1, {classes}), one logit per class")
        return network


FRAMEWORK = TorchFramework()
