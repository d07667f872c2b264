"""Which GPUs a pool's worker processes get (``--gpus-per-worker``; fedhub.device.gpus): no GPU is
needed to check the plan, the refusal and what the environment says; tests/test_simulation_pool.py
checks that each worker process sees its share."""

from __future__ import annotations

import pytest

import fedhub.simulate as simulate
from fedhub.device import gpus

from .cli_inprocess import assert_one_line_error, run_main


@pytest.mark.parametrize(("workers", "share", "visible", "plan"), [
    (3, 0.0, ["0"], [[], [], []]),  # the default: every worker on the CPU
    (4, 0.5, ["0", "1"], [["0"], ["1"], ["0"], ["1"]]),
    (2, 0.5, ["0", "1"], [["0"], ["1"]]),  # spread: each on its own GPU while there are enough
    (3, 0.5, ["0", "1"], [["0"], ["1"], ["0"]]),
    (2, 0.4, ["3"], [["3"], ["3"]]),  # two workers fit on a GPU at 0.4 each
    (2, 1, ["0", "1", "2"], [["0"], ["1"]]),
    (2, 2, ["4", "5", "6", "7"], [["4", "5"], ["6", "7"]]),
])
def test_each_worker_gets_its_share_of_the_visible_gpus(workers, share, visible, plan):
    assert gpus.assign(workers, share, visible) == plan


@pytest.mark.parametrize(("workers", "share", "visible", "message"), [
    (2, 1, [], "--gpus-per-worker 1 for 2 workers needs 2 GPUs; none is visible here"),
    (3, 0.5, ["0"], "--gpus-per-worker 0.5 for 3 workers needs 2 GPUs; 1 is visible"),
    (1, 2, ["0"], "--gpus-per-worker 2 for 1 worker needs 2 GPUs; 1 is visible"),
    (1, 1.5, ["0", "1"], "--gpus-per-worker 1.5: above 1 it must be a whole number of GPUs"),
])
def test_a_share_that_does_not_go_round_is_refused_saying_what_is_missing(workers, share, visible, message):
    with pytest.raises(ValueError) as refusal:
        gpus.assign(workers, share, visible)
    assert str(refusal.value).startswith(message)


@pytest.mark.parametrize(("value", "seen"), [
    ("0,1", ["0", "1"]), ("", []), ("-1", []), (" 2 , 3 ", ["2", "3"]), ("GPU-8a3f", ["GPU-8a3f"])])
def test_visible_gpus_are_what_cuda_visible_devices_names(monkeypatch, value, seen):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert gpus.visible() == seen


def test_without_the_variable_or_nvidia_smi_no_gpu_is_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert gpus.visible() == []


def test_simulate_refuses_gpus_that_are_not_there_before_starting(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = ["--devices", "8", "--workers", "2", "--gpus-per-worker"]
    assert_one_line_error(run_main(simulate.parse_args, [*args, "1"]),
                          "error: --gpus-per-worker 1 for 2 workers needs 2 GPUs; none is visible here "
                          "(CUDA_VISIBLE_DEVICES, nvidia-smi)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert simulate.parse_args([*args, "0.5"]).gpus_per_worker == 0.5
