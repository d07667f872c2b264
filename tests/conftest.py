"""Shared fixtures: the data folder, free ports, and real server/device processes."""

from __future__ import annotations

import ast
import contextlib
import multiprocessing.process
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedhub.server_process import ServerProcess, free_port  # noqa: F401 - the tests import both from here

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDHUB_DATA_DIR") or ROOT.parent / "shared/data/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# The fast tier (`make test-fast`: `-m "not slow and not docker"`) must stay fast: a test without
# the `slow` (or `docker`) marker may neither start a process nor import TensorFlow. The guard
# below fails such a test, so a slow test cannot drift into the fast tier unnoticed.

_HEAVY_MODULES = ("tensorflow", "keras")


def _is_fast(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is None and item.get_closest_marker("docker") is None


def _heavy_loaded() -> set[str]:
    return {name for name in _HEAVY_MODULES if name in sys.modules}


# test module -> the heavy modules its import (at collection) brought in
_COLLECTION_IMPORTS: dict[str, set[str]] = {}


@contextlib.contextmanager
def _processes_started() -> Iterator[list[str]]:
    """Record every process started meanwhile, through subprocess or multiprocessing. Recorded,
    not refused: a refusal raised inside someone's import (importing TensorFlow runs `uname -p`)
    would leave that module half imported for the tests after."""
    started: list[str] = []
    real_execute = subprocess.Popen._execute_child
    real_start = multiprocessing.process.BaseProcess.start

    def execute_child(self, args, *rest, **kw):
        started.append(f"subprocess {args!r}"[:300])
        return real_execute(self, args, *rest, **kw)

    def start(self):
        started.append(f"multiprocessing {self!r}"[:300])
        return real_start(self)

    subprocess.Popen._execute_child = execute_child
    multiprocessing.process.BaseProcess.start = start
    try:
        yield started
    finally:
        subprocess.Popen._execute_child = real_execute
        multiprocessing.process.BaseProcess.start = real_start


def _guarded(item: pytest.Item, phase: str) -> Iterator[None]:
    """Run a fast-tier test's phase, then fail it if it started a process or imported TensorFlow."""
    if not _is_fast(item):
        return (yield)
    before = _heavy_loaded()
    with _processes_started() as started:
        result = yield
    problems = []
    imported = _heavy_loaded() - before
    if imported:
        problems.append(f"imported {', '.join(sorted(imported))}")
    if started:
        problems.append(f"started {len(started)} process(es), the first: {started[0]}")
    if problems:
        raise pytest.fail.Exception(
            f"{item.nodeid} is in the fast tier (not marked slow) but its {phase} "
            f"{'; '.join(problems)}. Mark it @pytest.mark.slow, or test in-process without TensorFlow",
            pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    module = item.nodeid.split("::", 1)[0]
    if _is_fast(item) and module in _COLLECTION_IMPORTS:
        # A module that imports TensorFlow when collected cannot hold fast-tier tests.
        raise pytest.fail.Exception(
            f"{item.nodeid} is in the fast tier but {module} imports "
            f"{', '.join(sorted(_COLLECTION_IMPORTS[module]))} when it is collected; import it inside "
            "the slow tests that need it, or mark them slow", pytrace=False)
    return (yield from _guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Note the test module whose import (at collection) brought TensorFlow in."""
    before = _heavy_loaded()
    report = yield
    imported = _heavy_loaded() - before
    if imported and isinstance(collector, pytest.Module):
        _COLLECTION_IMPORTS[collector.nodeid] = imported
    return report


def _fast_tier(config: pytest.Config) -> bool:
    return "not slow" in (config.getoption("markexpr") or "")


def _all_slow(path: Path) -> bool:
    """Whether a test module marks all its tests slow (``pytestmark = pytest.mark.slow`` at module
    level), read from its source: the fast tier then need not import it at all."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
               and ("mark.slow" in ast.unparse(node.value) or "mark.docker" in ast.unparse(node.value))
               for node in tree.body)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The fast tier leaves out the modules whose tests are all slow, unimported: several import
    TensorFlow at module level, which would cost the tier its import and blind the guard."""
    if (_fast_tier(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_")
            and _all_slow(collection_path)):
        return True
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """The fast tier (``-m "not slow ..."``) collects every module, slow ones included: one that
    imports TensorFlow when collected costs the tier its import and hides from the guard any fast
    test that imports it later. Refuse to run the tier then, naming the modules."""
    if _fast_tier(session.config) and _COLLECTION_IMPORTS:
        raise pytest.UsageError(
            "the fast tier must not import TensorFlow while collecting, but "
            + "; ".join(f"{module} imports {', '.join(sorted(names))} at module level"
                        for module, names in sorted(_COLLECTION_IMPORTS.items()))
            + ": import it inside the (slow) tests that need it, or mark the whole module slow")


# ---------------------------------------------------------------------------------------------
# `make test` runs on two pytest-xdist workers (`--dist loadscope`): most slow tests wait on
# their processes more than they compute. The scheduler below hands out whole modules, so a
# module's module-scoped servers and browsers start once and `make docker` runs in one worker
# only; the modules that start a Ray cluster form one unit, so two clusters never start at once.
# (xdist's own `--dist loadgroup` does not group under pytest 9, whose nodeid it can no longer
# rename.) The slowest modules (a full run's --durations=0; test_docker builds its images first)
# are handed out first (`--no-loadscope-reorder` keeps the collection's order), so that none
# starts last and leaves the other worker idle while it runs.

_UNITS = {module: "ray" for module in
          ("tests/test_ray.py", "tests/test_ray_cli.py", "tests/test_torch_simulation.py")}
_SLOWEST_FIRST = ("tests/test_docker.py", "tests/test_relay.py", "tests/test_combinations.py",
                  "tests/test_async.py", "tests/test_hostile_input.py", "tests/test_federation.py",
                  "tests/test_simulation_pool.py", "tests/test_faults.py")


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = _module(item.nodeid)
        return _SLOWEST_FIRST.index(module) if module in _SLOWEST_FIRST else len(_SLOWEST_FIRST)

    items.sort(key=rank)  # stable: each module's own order stays


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return _UNITS.get(module, module)

    return ByModule(config, log)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train-labels-idx1-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {DATA_DIR}; set FEDHUB_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def fashion(data_dir):
    """The whole of Fashion-MNIST, loaded once: ((x_train, y_train), (x_test, y_test))."""
    from fedhub.split import load_fashion_mnist

    return load_fashion_mnist(data_dir)


CIFAR_DIR = Path(os.environ.get("FEDHUB_CIFAR_DIR") or ROOT.parent / "shared/data/cifar-10")
# Child processes that train with PyTorch get one thread each: the machine is shared.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cifar():
    """CIFAR-10 as the data sets module reads it: ((x_train, y_train), (x_test, y_test))."""
    from fedhub import datasets

    if not CIFAR_DIR.is_dir():
        pytest.fail(f"CIFAR-10 not found in {CIFAR_DIR}; set FEDHUB_CIFAR_DIR")
    return datasets.load("cifar-10", CIFAR_DIR)


@pytest.fixture(scope="module")
def torch_one_thread():
    """PyTorch in this process on one thread for the module's tests, restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)




def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def server_factory(tmp_path, data_dir):
    servers: list[ServerProcess] = []

    def make(*args: str, **kw) -> ServerProcess:
        s = ServerProcess(tmp_path, data_dir, *args, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def split_devices(tmp_path, data_dir):
    """``split_devices(n, limit)``: real Fashion-MNIST shares in device folders, via the real CLI."""

    def make(n: int, limit: int = 300) -> Path:
        root = tmp_path / "devices"
        out = subprocess.run(
            [sys.executable, "-m", "fedhub.split", "--devices", str(n), "--limit", str(limit),
             "--data-dir", str(data_dir), "--out", str(root), "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return root

    return make


def launch_devices(server: ServerProcess, root: Path, names, *extra: str):
    """Real device processes against ``server``, their output in ``root/../logs/NAME.log``."""
    from fedhub.device.launcher import launch

    return launch(server.url, names, devices_root=root, env={"FEDHUB_ENROLL_SECRET": server.enroll_secret},
                  extra_args=["--poll-wait", "2", "--retry-for", "120", *extra], log_dir=root.parent / "logs")


def stop_processes(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """Ctrl-C every process still running, then wait for each (killed past ``timeout``)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
