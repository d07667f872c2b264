"""Every combination works, or says why: mode x strategy family x compression x DP x secure
aggregation, 2 x 3 x 3 x 4 x 2 = 144 cells.

Each cell is classified by ``FederationConfig.validate()`` against the rules written out in
:func:`expected_refusal` (the README's "Combinations" table): a refused cell must be refused with
one line that holds its reason; every other cell runs end to end, a real server with PyTorch
devices on a worker pool training on Fashion-MNIST, and must finish its rounds (or versions)
with a finite accuracy, an epsilon that grows with each one under DP, fewer bytes up than the
same cell uncompressed, and secure aggregation in the history when it is on.

The runs are what costs: each starts a server and a pool worker (a process that imports
PyTorch), so they are tiny (3 devices of 32 examples, 2 rounds, 50 test images) and run a few
at a time, all of those the session selected at once, the first time a cell asks for one.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fedhub.engine.config import FederationConfig, TrainingConfig
from fedhub.engine.secagg import SecAggConfig

from .conftest import ROOT

MODES = ("sync", "async")
FAMILIES = {"averaging": "fedavg", "server-optimizer": "fedadam", "robust": "fedmedian"}
COMPRESSIONS = ("none", "q8", "topk:0.1")
DPS = ("none", "central-fixed", "local", "distributed")
SECURE = (False, True)
CELLS = list(itertools.product(MODES, FAMILIES, COMPRESSIONS, DPS, SECURE))

DEVICES, EXAMPLES, ROUNDS = 3, 32, 2
# Distributed DP's noise share (z C / sqrt(3) = 0.087) must fit in the secure clip: 0.5 + 4 x 0.087 < 1.
DP = {"noise_multiplier": 0.3, "clipping_norm": 0.5}
SECAGG_CLIP = 1.0
PARALLEL = 3  # runs at a time: each mostly waits for its worker to import PyTorch and enroll


def settings(mode: str, family: str, compression: str, dp: str, secure: bool) -> dict[str, Any]:
    """The cell's server settings, as fedhub.simulate and FederationConfig take them."""
    return {"mode": mode, "strategy": FAMILIES[family], "min_devices": DEVICES, "buffer_size": DEVICES,
            "compression": compression, "dp": None if dp == "none" else {"mode": dp, **DP},
            "secagg": SecAggConfig(clip_range=SECAGG_CLIP) if secure else None}


def federation(**kw: Any) -> FederationConfig:
    kw = dict(kw)
    return FederationConfig(training=TrainingConfig(compression=kw.pop("compression")), **kw)


def expected_refusal(mode: str, family: str, compression: str, dp: str, secure: bool) -> str | None:
    """Why the cell cannot work (a phrase its one-line refusal must hold), or None if it runs:
    the rules of the README's table, in the order start-up applies them."""
    robust = family == "robust"
    if dp == "central-fixed" and robust:
        return "it sees one private mean, nothing to compare"
    if dp == "distributed" and robust:
        return "secure aggregation reveals only the sum"
    if mode == "async" and secure:
        return "a masked sum needs a fixed cohort that deals key shares before anyone uploads"
    if secure:
        if dp == "local":
            return "sqrt(devices) times what a masked sum needs"
        if dp == "central-fixed":
            return "central DP clips each device's update on the server"
        if robust:
            return "it compares the devices' updates one by one"
        if compression.startswith("topk"):
            return "so a masked upload is dense and saves nothing"
        return None
    if dp == "distributed":
        return "each device adds only a share of the noise"
    return None


def refusal(cell: tuple) -> str | None:
    """What ``validate()`` says of the cell: its one-line refusal, or None."""
    try:
        federation(**settings(*cell)).validate()
    except ValueError as exc:
        return str(exc)
    return None


def test_the_table_has_144_cells_and_56_run():
    assert len(CELLS) == len(set(CELLS)) == 144
    assert sum(expected_refusal(*cell) is None for cell in CELLS) == 56


@pytest.mark.parametrize("cell", CELLS, ids=["-".join(map(str, c)) for c in CELLS])
def test_a_cell_that_cannot_work_is_refused_with_one_line_saying_why(cell):
    why, said = expected_refusal(*cell), refusal(cell)
    if why is None:
        assert said is None, said
        return
    assert said is not None, f"{cell} should be refused ({why})"
    assert "\n" not in said and why in said, said
    assert re.search(r"(cannot|needs|wraps)[^:]*: ", said), f"no reason after the refusal: {said}"


# ------------------------------------------------------------------------- end to end (slow)

class Runs:
    """The cells' runs, started together the first time one is asked for."""

    def __init__(self, cells: list[tuple], root: Path, data_dir: Path, partitions: list) -> None:
        self.cells = cells
        self.root = root
        self.data_dir = data_dir
        self.partitions = partitions
        self._lock = threading.Lock()
        self._futures: dict[tuple, Future] = {}
        self._pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="combination")

    def get(self, cell: tuple) -> Any:
        with self._lock:
            if not self._futures:
                for c in self.cells:
                    self._futures[c] = self._pool.submit(self._run, c)
            if cell not in self._futures:  # not among the selected: run it now
                self._futures[cell] = self._pool.submit(self._run, cell)
        return self._futures[cell].result()

    def _run(self, cell: tuple) -> Any:
        import fedhub

        return fedhub.simulate("basic", self.partitions, framework="torch", rounds=ROUNDS, workers=1,
                               batch_size=16, data_dir=str(self.data_dir), test_limit=50, timeout=240,
                               root=self.root / "-".join(map(str, cell)).replace(":", ""),
                               relay="each-update" not in cell, **settings(*cell[:5]))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def baseline(cell: tuple) -> tuple:
    """The same cell uncompressed, to compare its bytes with. Where its rounds would take partial
    sums (the pool's worker then sends one sum a round, of clipped changes under central DP: README,
    Relays), with each update on its own instead, as compressed updates always go."""
    mode, family, _, dp, secure = cell
    sums = mode == "sync" and family != "robust" and (dp == "none" or dp.startswith("central")) and not secure
    return (mode, family, "none", dp, secure) + (("each-update",) if sums else ())


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, fashion, data_dir):
    """Every selected cell that runs, and the uncompressed cells they are compared with."""
    selected = [item.callspec.params["cell"] for item in request.session.items
                if item.originalname == "test_every_cell_that_can_work_runs_end_to_end"]
    cells = list(dict.fromkeys(c for cell in selected for c in (baseline(cell), cell)))
    (x, y), _ = fashion
    partitions = [(x[i * EXAMPLES:(i + 1) * EXAMPLES], y[i * EXAMPLES:(i + 1) * EXAMPLES])
                  for i in range(DEVICES)]
    runs = Runs(cells, tmp_path_factory.mktemp("combinations"), data_dir, partitions)
    yield runs
    runs.close()


RUNNING = [cell for cell in CELLS if expected_refusal(*cell) is None]


@pytest.mark.slow
@pytest.mark.parametrize("cell", RUNNING, ids=["-".join(map(str, c)) for c in RUNNING])
def test_every_cell_that_can_work_runs_end_to_end(cell, runs):
    mode, family, compression, dp, secure = cell
    history = runs.get(cell)
    assert [entry["round"] for entry in history] == list(range(1, ROUNDS + 1))
    for entry in history:
        assert math.isfinite(entry["test_accuracy"]) and math.isfinite(entry["test_loss"]), entry
        assert entry["strategy"]["name"].endswith(FAMILIES[family] + (")" if dp != "none" else "")), entry
        assert (entry.get("mode") or "sync") == mode, entry
    if dp != "none":
        privacy = [entry["privacy"] for entry in history]
        assert {p["mode"] for p in privacy} == {dp}
        epsilons = [p["epsilon"] for p in privacy]
        assert 0 < epsilons[0] < epsilons[1], epsilons
    if secure:
        for entry in history:
            secagg = entry["secagg"]
            assert secagg["enabled"] and secagg["survivors"] == DEVICES, secagg
            if compression == "q8":  # 8-bit codes in the smallest field for 3 devices x 10,000 x 127
                assert (secagg["quantization"], secagg["bits"]) == (8, 23), secagg
            else:
                assert "quantization" not in secagg and secagg["bits"] == 32, secagg
    else:
        assert all("secagg" not in entry for entry in history)
    if compression != "none":
        plain = runs.get(baseline(cell))
        # Per task trained: an asynchronous run's devices may train more often in one run than
        # in another before it ends; each trained task is one upload.
        per_upload = history.stats["bytes_up"] / len(history.stats["tasks"])
        plain_per_upload = plain.stats["bytes_up"] / len(plain.stats["tasks"])
        ratio = per_upload / plain_per_upload
        # q8 sends a quarter of float32; secure q8 23 bits of 32; top-k 10 % of the values and indices
        limit = 0.8 if secure else 0.35
        assert ratio < limit, (ratio, history.stats["bytes_up"], plain.stats["bytes_up"])


# ------------------------------------------------------------------------- the README's table

def _readme_table() -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """The "Combinations" table's rows (the setting's first flags, its four cells) and footnotes."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Combinations\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`--"):
            rows.append((re.match(r"`([^`]*)`", cells[0]).group(1), cells[1:]))
    notes = dict(re.findall(r"^- \((\w)\) [^:]*: (.*)\.$", section, flags=re.M))
    return rows, notes


def _cell_of(flags: str, mode: str, secure: bool) -> tuple:
    options = dict(zip(*[iter(flags.split())] * 2, strict=True))
    strategy = options.get("--strategy", "fedavg")
    family = {"fedavg": "averaging", "fedadam": "server-optimizer", "fedmedian": "robust"}[strategy]
    return mode, family, options.get("--compression", "none"), options.get("--dp", "none"), secure


def test_the_readme_table_says_what_start_up_says():
    rows, notes = _readme_table()
    assert len(rows) == 9 and set(notes) == set("abcdefg"), (rows, notes)
    columns = [("sync", False), ("async", False), ("sync", True), ("async", True)]
    for flags, cells in rows:
        for (mode, secure), text in zip(columns, cells, strict=True):
            said = refusal(_cell_of(flags, mode, secure))
            where = f"README row {flags!r}, column {mode}{' + secure aggregation' if secure else ''}"
            if text.startswith("runs"):
                assert said is None, f"{where} says it runs; start-up says: {said}"
            else:
                note = re.fullmatch(r"refused \((\w)\)", text)
                assert note and said is not None, f"{where}: {text!r}, start-up says {said!r}"
                assert notes[note.group(1)] in said, f"{where}: ({note.group(1)}) is not why: {said}"
