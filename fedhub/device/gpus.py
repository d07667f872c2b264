"""Which GPUs a pool's worker processes train on (``--gpus-per-worker``).

Ray places its actors on GPUs itself (``num_gpus``); process workers get theirs here, as the
``CUDA_VISIBLE_DEVICES`` of each worker process, which both TensorFlow and PyTorch obey: a share
below 1 lets several workers share a GPU (``0.5``: up to two a GPU, spread over all of them), a
whole number gives each worker that many GPUs of its own, and 0 (the default) hides the GPUs, so
the workers train on the CPU as Ray's actors without GPUs do.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess


def visible() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them: that variable's
    entries where it is set, else the indices ``nvidia-smi -L`` lists (none without it)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        entries = [entry.strip() for entry in listed.split(",") if entry.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way of saying "none"
        return [] if not entries or entries[0].startswith("-") else entries
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def assign(workers: int, per_worker: float, gpus: list[str]) -> list[list[str]]:
    """Each worker's GPUs, ``per_worker`` of them each out of ``gpus``: ValueError saying what is
    missing when they do not go round (a share above 1 must be a whole number)."""
    if per_worker <= 0:
        return [[] for _ in range(workers)]
    if per_worker < 1:
        per_gpu = math.floor(1 / per_worker + 1e-9)  # 0.5: two workers a GPU; 0.4: two as well
        need = math.ceil(workers / per_gpu)
        # spread over every GPU (none then holds more than per_gpu): two workers, two GPUs, one each
        plan = [[gpus[k % len(gpus)]] for k in range(workers)] if need <= len(gpus) else []
    else:
        if per_worker != int(per_worker):
            raise ValueError(f"--gpus-per-worker {per_worker:g}: above 1 it must be a whole number of GPUs")
        size = int(per_worker)
        need = workers * size
        plan = [gpus[k * size : (k + 1) * size] for k in range(workers)] if need <= len(gpus) else []
    if not plan:
        have = f"{len(gpus)} {'is' if len(gpus) == 1 else 'are'} visible" if gpus else "none is visible here"
        raise ValueError(f"--gpus-per-worker {per_worker:g} for {workers} worker{'s' * (workers != 1)} "
                         f"needs {need} GPU{'s' * (need != 1)}; {have} (CUDA_VISIBLE_DEVICES, nvidia-smi)")
    return plan


def share_memory(framework: str) -> None:
    """TensorFlow takes all of a GPU's memory by default; workers sharing a GPU must grow theirs
    as needed instead (as Flower's actors do). PyTorch takes memory as it needs it, and a
    PyTorch worker must not import TensorFlow at all."""
    if framework != "keras":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
