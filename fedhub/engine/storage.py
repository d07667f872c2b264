"""Durable state: one SQLite file (devices, runs, rounds, updates, settings) and
safetensors checkpoints of every round's global model, in each run's folder.

SQLite gives atomic transactions for free; checkpoints are written to a
temporary file and renamed, and a round is marked complete only after its
checkpoint is on disk, so the "latest model" is never a half-written file.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .files import atomic_write_bytes, remove_stale_temporaries

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    active INTEGER NOT NULL DEFAULT 0,
    num_examples INTEGER,
    registered_at REAL NOT NULL,
    last_seen REAL,
    state TEXT NOT NULL DEFAULT 'idle',
    info TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS relays (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    settings TEXT,
    status TEXT NOT NULL DEFAULT 'idle',
    folder TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS device_lifecycle (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    round INTEGER,
    validation TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS device_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    time REAL NOT NULL,
    round INTEGER,
    received_at REAL NOT NULL,
    run_id INTEGER
);
CREATE INDEX IF NOT EXISTS device_logs_by_device ON device_logs (device, id);
"""
# The tables of one run: each row belongs to the run its run_id names (RUN_TABLES' keys start
# with it), so round numbers start at 0 again in every run and nothing of another run is touched.
RUN_TABLES = {
    "rounds": """(
    run_id INTEGER NOT NULL,
    number INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    closed_at REAL,
    selected TEXT NOT NULL DEFAULT '[]',
    config TEXT NOT NULL DEFAULT '{}',
    num_updates INTEGER NOT NULL DEFAULT 0,
    num_examples INTEGER NOT NULL DEFAULT 0,
    test_loss REAL,
    test_accuracy REAL,
    checkpoint TEXT,
    PRIMARY KEY (run_id, number)
)""",
    "updates": """(
    run_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    upload_id TEXT,
    body_sha256 TEXT,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, device)
)""",
    "history": """(
    run_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
)""",
    "round_failures": """(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    started_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    reason TEXT NOT NULL
)""",
    "async_updates": """(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    target INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    weight REAL NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    upload_id TEXT,
    body_sha256 TEXT,
    body_path TEXT NOT NULL,
    folded INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL
)""",
}
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS async_updates_by_run_key ON async_updates (run_id, device, upload_id);
CREATE INDEX IF NOT EXISTS round_failures_by_run ON round_failures (run_id, id);
CREATE INDEX IF NOT EXISTS device_logs_by_run ON device_logs (run_id, round);
"""


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


class StorageError(OSError):
    """The state directory's database cannot be opened or created; the message names the file."""


# What a run's files are kept under, besides the state directory's first run (its own top level).
RUNS_FOLDER = "runs"


def slug(name: str) -> str:
    """A run's name as a folder name: letters, digits, ``-``, ``_`` and ``.``, at most 40."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "run"


class Storage:
    """Thread-safe access to the SQLite file and the checkpoint folder.

    A state directory keeps every run (:meth:`create_run`); this object is scoped to one of them,
    the current run (:attr:`run_id`, :meth:`use_run`): every run-scoped read and write (rounds,
    updates, history, failures, asynchronous updates, checkpoints) is that run's, so the engine
    above it is the same whichever run it drives. Devices, their tokens and lifecycle belong to
    the state directory, not to a run."""

    def __init__(self, state_dir: str | Path, *, scoped: bool = True) -> None:
        """``scoped=False``: a reader beside a server (``fedhub runs``), scoped to no run, which
        touches no run's folder (a server may be writing a checkpoint there)."""
        self.state_dir = Path(state_dir)
        self.db_path = self.state_dir / "fedhub.sqlite3"
        self.run_id: int | None = None
        self.run_dir = self.state_dir
        self.checkpoint_dir = self.state_dir / "saved"
        self._lock = threading.RLock()
        self._depth = 0  # transactions open (nested ones join the outermost)
        self._after: list[Callable[[], None]] = []  # run when the outermost transaction commits
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the state folder {self.state_dir}: "
                               f"{exc.strerror or exc}") from None
        try:
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._db.executescript(INDEXES)
        except sqlite3.Error as exc:
            # Another file under its name, an unwritable folder: one line for the command
            # (server.py prints it as "error: ..."), not a traceback.
            raise StorageError(f"cannot use {self.db_path} as the state database: {exc}") from None
        current = self.get_setting("current_run")
        if scoped and current is not None and self.get_run(int(current)) is not None:
            self.use_run(int(current))

    def _columns(self, table: str) -> set[str]:
        return {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        """Bring a database written by an older version up to this schema. Before runs, a state
        directory held one run: its rows become run 1 (its files stay where they are, the state
        directory's top level being run 1's folder), its status moves to the runs table, and its
        settings are unknown (None) until a server adopts its own for it (:mod:`.runs`)."""
        self._db.execute("BEGIN IMMEDIATE")  # one process migrates; another then finds it done
        try:
            legacy = {t for t in RUN_TABLES if self._columns(t) and "run_id" not in self._columns(t)}
            if "updates" in legacy and "body_sha256" not in self._columns("updates"):
                self._db.execute("ALTER TABLE updates ADD COLUMN body_sha256 TEXT")
            if "run_id" not in self._columns("device_logs"):
                self._db.execute("ALTER TABLE device_logs ADD COLUMN run_id INTEGER")
                self._db.execute("UPDATE device_logs SET run_id = 1")
            had_rounds = "rounds" in legacy and bool(
                self._db.execute("SELECT 1 FROM rounds LIMIT 1").fetchone())
            for table, columns in RUN_TABLES.items():
                if table not in legacy:
                    self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} {columns}")
                    continue
                names = ", ".join(self._columns(table))
                self._db.execute(f"ALTER TABLE {table} RENAME TO {table}_before_runs")
                self._db.execute(f"CREATE TABLE {table} {columns}")
                self._db.execute(f"INSERT INTO {table} (run_id, {names}) SELECT 1, {names} "
                                 f"FROM {table}_before_runs")
                self._db.execute(f"DROP TABLE {table}_before_runs")
            if had_rounds:
                row = self._db.execute("SELECT value FROM settings WHERE key = 'status'").fetchone()
                first = self._db.execute("SELECT MIN(started_at) FROM rounds").fetchone()[0]
                self._db.execute(
                    "INSERT INTO runs(id, name, settings, status, folder, created_at) "
                    "VALUES (1, 'run-1', NULL, ?, '', ?)", (row[0] if row else "idle", first or 0.0))
                self._db.execute("INSERT INTO settings(key, value) VALUES ('current_run', '1') "
                                 "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, params: tuple | Mapping = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        with self._lock:
            return _row(self._db.execute(sql, params).fetchone())

    def _all(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, params).fetchall()]

    def transaction(self, durable: bool = True) -> _Transaction:
        """``with storage.transaction():`` groups writes into one atomic commit (and one fsync).

        ``durable=False`` commits without waiting for the disk: still atomic, and kept if the
        process dies, but a power cut may roll it back, with whatever committed after it. For
        what a restart forgets or rebuilds anyway (an open round's updates, lifecycle states),
        so that a thousand devices' uploads do not each wait for an fsync under the lock.
        The outermost transaction decides."""
        return _Transaction(self, durable)

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once what was written so far is committed: at once outside a
        transaction, else when the outermost one commits (never if it rolls back). For memory
        that mirrors rows (the lifecycle states), so it never shows what SQLite does not hold.
        ``action`` runs with the storage lock held: it must take no lock but a leaf one."""
        with self._lock:
            if self._depth == 0:
                action()
            else:
                self._after.append(action)

    # settings -----------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return row["value"] if row else default

    def set_setting(self, key: str, value: str) -> None:
        self._exec(
            "INSERT INTO settings(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # runs ---------------------------------------------------------------
    def create_run(self, name: str | None, settings: Mapping[str, Any] | None, *, now: float,
                   label: str = "run", status: str = "idle") -> int:
        """A new run's row and folder, ``runs/<id>-<name>/`` (the state directory's first run
        keeps its top level, where a state directory kept its one run before runs were kept).
        ``name`` None: ``<label>-<id>``. ValueError if the name is taken."""
        with self.transaction():
            if name is not None and self._one("SELECT id FROM runs WHERE name = ?", (name,)) is not None:
                raise ValueError(f"a run named {name!r} exists already")
            first = self._one("SELECT COUNT(*) AS n FROM runs")["n"] == 0 and not any(
                (self.state_dir / "saved").glob("round_*.safetensors"))
            cursor = self._exec(
                "INSERT INTO runs(name, settings, status, folder, created_at) VALUES (?, ?, ?, '', ?)",
                (f".new-{now}-{threading.get_ident()}", None if settings is None
                 else json.dumps(dict(settings)), status, now))
            run_id = int(cursor.lastrowid)
            if name is None:
                name = f"{label}-{run_id}"
                taken = self.run_names()
                while name in taken:
                    name += "-"
            folder = "" if first else f"{RUNS_FOLDER}/{run_id}-{slug(name)}"
            self._exec("UPDATE runs SET name = ?, folder = ? WHERE id = ?", (name, folder, run_id))
        return run_id

    def use_run(self, run_id: int) -> None:
        """Scope every run-scoped read and write to run ``run_id`` from now on (and remember it as
        the state directory's current run)."""
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id}")
        folder = self.state_dir / run["folder"]
        try:
            (folder / "saved").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the run's folder {folder}: {exc.strerror or exc}") from None
        with self._lock:
            self.run_id, self.run_dir, self.checkpoint_dir = run_id, folder, folder / "saved"
            if self.get_setting("current_run") != str(run_id):  # a reader (fedhub runs) writes nothing
                self.set_setting("current_run", str(run_id))
        # A crash (SIGKILL, power loss) during a checkpoint write leaves its temporary file behind.
        remove_stale_temporaries(self.checkpoint_dir, ".safetensors")

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        return _decode_run(self._one("SELECT * FROM runs WHERE id = ?", (run_id,)))

    def find_run(self, key: str | int) -> dict[str, Any] | None:
        """A run by its id (a number, or its digits) or its name."""
        if isinstance(key, int) or re.fullmatch(r"[0-9]{1,18}", str(key)):
            run = self.get_run(int(key))
            if run is not None:
                return run
        return _decode_run(self._one("SELECT * FROM runs WHERE name = ?", (str(key),)))

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first, with its completed rounds (round 0, the initial model, not
        counted)."""
        rows = self._all(
            "SELECT runs.*, (SELECT COUNT(*) FROM rounds WHERE rounds.run_id = runs.id AND"
            " rounds.status = 'complete' AND rounds.number > 0) AS completed_rounds,"
            " (SELECT MAX(number) FROM rounds WHERE rounds.run_id = runs.id AND"
            " rounds.status = 'complete') AS last_round"
            " FROM runs ORDER BY id DESC")
        return [_decode_run(r) for r in rows]

    def run_names(self) -> set[str]:
        return {r["name"] for r in self._all("SELECT name FROM runs")}

    def set_run_settings(self, settings: Mapping[str, Any]) -> None:
        self._exec("UPDATE runs SET settings = ? WHERE id = ?", (json.dumps(dict(settings)), self.run_id))

    def set_run_status(self, status: str, *, now: float | None = None, run_id: int | None = None) -> None:
        """A run's status (default: the current run's); ``finished_at`` is set when it becomes
        finished (or stopped: left unfinished for another run)."""
        run_id = self.run_id if run_id is None else run_id
        if run_id is None:
            return
        ended = now if status in ("finished", "stopped") else None
        self._exec("UPDATE runs SET status = ?, finished_at = ? WHERE id = ?", (status, ended, run_id))

    def last_round(self, run_id: int) -> int:
        """The number of a run's last completed round (0: none beyond the initial model)."""
        row = self._one("SELECT MAX(number) AS n FROM rounds WHERE run_id = ? AND status = 'complete'",
                        (run_id,))
        return int(row["n"] or 0)

    def run_status(self) -> str | None:
        run = self.get_run(self.run_id) if self.run_id is not None else None
        return run["status"] if run else None

    def delete_run(self, run_id: int) -> dict[str, Any]:
        """Remove a run that is not the current one: its rows, then its folder. KeyError if there
        is none; ValueError for the current run."""
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id}")
        if run_id == self.run_id or self.get_setting("current_run") == str(run_id):
            raise ValueError(f"run {run_id} is the current run")
        with self.transaction():
            for table in RUN_TABLES:
                self._exec(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            self._exec("DELETE FROM device_logs WHERE run_id = ?", (run_id,))
            self._exec("DELETE FROM runs WHERE id = ?", (run_id,))
        folder = self.state_dir / run["folder"]
        if run["folder"]:
            shutil.rmtree(folder, ignore_errors=True)
        else:  # the state directory's first run: only its own files, never the directory's others
            shutil.rmtree(folder / "saved", ignore_errors=True)
            shutil.rmtree(folder / "async", ignore_errors=True)
        return run

    def run_history(self, run_id: int) -> list[dict[str, Any]]:
        """Any run's history entries, oldest first (round 0 not among them)."""
        return [json.loads(r["entry"]) for r in self._all(
            "SELECT entry FROM history WHERE run_id = ? AND round > 0 ORDER BY round", (run_id,))]

    def run_folder(self, run: Mapping[str, Any]) -> Path:
        return self.state_dir / run["folder"]

    # devices ------------------------------------------------------------
    def add_device(self, name: str, token_hash: str, *, active: bool, now: float,
                   num_examples: int | None = None, info: Mapping[str, Any] | None = None) -> None:
        self._exec(
            "INSERT INTO devices(name, token_hash, active, num_examples, registered_at, last_seen, info)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, token_hash, int(active), num_examples, now, now, json.dumps(info or {})),
        )

    def get_device(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM devices WHERE name = ?", (name,))

    def device_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM devices WHERE token_hash = ?", (token_hash,))

    def list_devices(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM devices ORDER BY name")

    def update_device(self, name: str, **fields: Any) -> None:
        allowed = {"token_hash", "active", "num_examples", "last_seen", "state", "info"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown device fields {sorted(bad)}")
        if "info" in fields:
            fields["info"] = json.dumps(fields["info"])
        if "active" in fields:
            fields["active"] = int(fields["active"])
        assignments = ", ".join(f"{k} = :{k}" for k in fields)
        self._exec(f"UPDATE devices SET {assignments} WHERE name = :name", {**fields, "name": name})

    # rounds (each of the current run) ----------------------------------------
    def insert_round(self, number: int, *, started_at: float, selected: list[str],
                     config: Mapping[str, Any], status: str = "open") -> None:
        self._exec(
            "INSERT INTO rounds(run_id, number, status, started_at, selected, config)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self.run_id, number, status, started_at, json.dumps(selected), json.dumps(dict(config))),
        )

    def complete_round(self, number: int, *, closed_at: float, num_updates: int,
                       num_examples: int, test_loss: float | None, test_accuracy: float | None,
                       checkpoint: str) -> None:
        self._exec(
            "UPDATE rounds SET status = 'complete', closed_at = ?, num_updates = ?, num_examples = ?,"
            " test_loss = ?, test_accuracy = ?, checkpoint = ? WHERE run_id = ? AND number = ?",
            (closed_at, num_updates, num_examples, test_loss, test_accuracy, checkpoint, self.run_id,
             number),
        )

    def set_round_selected(self, number: int, selected: list[str]) -> None:
        self._exec("UPDATE rounds SET selected = ? WHERE run_id = ? AND number = ?",
                   (json.dumps(selected), self.run_id, number))

    def discard_round(self, number: int) -> None:
        """Forget a round that never completed, and the updates it had received."""
        with self.transaction():
            self._exec("DELETE FROM updates WHERE run_id = ? AND round = ?", (self.run_id, number))
            self._exec("DELETE FROM rounds WHERE run_id = ? AND number = ? AND status != 'complete'",
                       (self.run_id, number))

    def discard_unfinished_rounds(self) -> list[int]:
        numbers = [r["number"] for r in self._all(
            "SELECT number FROM rounds WHERE run_id = ? AND status != 'complete'", (self.run_id,))]
        for n in numbers:
            self.discard_round(n)
        return numbers

    def get_round(self, number: int) -> dict[str, Any] | None:
        return _decode_round(self._one("SELECT * FROM rounds WHERE run_id = ? AND number = ?",
                                       (self.run_id, number)))

    def last_complete_round(self) -> dict[str, Any] | None:
        return _decode_round(self._one(
            "SELECT * FROM rounds WHERE run_id = ? AND status = 'complete' ORDER BY number DESC LIMIT 1",
            (self.run_id,)))

    def list_rounds(self) -> list[dict[str, Any]]:
        return [_decode_round(r) for r in self._all(
            "SELECT * FROM rounds WHERE run_id = ? ORDER BY number", (self.run_id,))]

    # history ------------------------------------------------------------
    def put_history(self, round_number: int, entry: Mapping[str, Any]) -> None:
        """Store (or replace) a completed round's history entry, built once when it closed."""
        self._exec("INSERT INTO history(run_id, round, entry) VALUES (?, ?, ?) ON CONFLICT(run_id, round)"
                   " DO UPDATE SET entry = excluded.entry",
                   (self.run_id, round_number, json.dumps(dict(entry))))

    def list_history(self) -> list[dict[str, Any]]:
        return [json.loads(r["entry"]) for r in self._all(
            "SELECT entry FROM history WHERE run_id = ? ORDER BY round", (self.run_id,))]

    def add_round_failure(self, round_number: int, *, started_at: float, failed_at: float,
                          reason: str) -> None:
        self._exec("INSERT INTO round_failures(run_id, round, started_at, failed_at, reason)"
                   " VALUES (?, ?, ?, ?, ?)", (self.run_id, round_number, started_at, failed_at, reason))

    def list_round_failures(self, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` failed attempts at a round, oldest first."""
        rows = self._all("SELECT round, started_at, failed_at, reason FROM round_failures"
                         " WHERE run_id = ? ORDER BY id DESC LIMIT ?", (self.run_id, limit))
        return rows[::-1]

    # relays -------------------------------------------------------------
    def set_relay(self, name: str, token_hash: str, *, now: float) -> None:
        """Enroll relay ``name``, or give it a new token."""
        self._exec("INSERT INTO relays(name, token_hash, registered_at) VALUES (?, ?, ?)"
                   " ON CONFLICT(name) DO UPDATE SET token_hash = excluded.token_hash",
                   (name, token_hash, now))

    def get_relay(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM relays WHERE name = ?", (name,))

    def relay_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM relays WHERE token_hash = ?", (token_hash,))

    # updates ------------------------------------------------------------
    def add_update(self, round_number: int, device: str, *, num_examples: int,
                   metrics: Mapping[str, float], upload_id: str | None, now: float,
                   body_sha256: str | None = None) -> None:
        """``upload_id`` (the Idempotency-Key) is kept with the digest of the body it came with."""
        self._exec(
            "INSERT INTO updates(run_id, round, device, num_examples, metrics, upload_id, body_sha256,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (self.run_id, round_number, device, num_examples, json.dumps(dict(metrics)), upload_id,
             body_sha256, now),
        )

    def get_update(self, round_number: int, device: str) -> dict[str, Any] | None:
        return _decode_update(self._one(
            "SELECT * FROM updates WHERE run_id = ? AND round = ? AND device = ?",
            (self.run_id, round_number, device)))

    def list_updates(self, round_number: int | None = None) -> list[dict[str, Any]]:
        if round_number is None:
            rows = self._all("SELECT * FROM updates WHERE run_id = ? ORDER BY round, device",
                             (self.run_id,))
        else:
            rows = self._all("SELECT * FROM updates WHERE run_id = ? AND round = ? ORDER BY device",
                             (self.run_id, round_number))
        return [_decode_update(r) for r in rows]

    # asynchronous mode's updates: each waits, body on disk, until its model version is made
    def add_async_update(self, device: str, *, target: int, base_version: int, staleness: int,
                         weight: float, num_examples: int, metrics: Mapping[str, float],
                         upload_id: str | None, body_sha256: str | None, body_path: str,
                         now: float) -> None:
        self._exec(
            "INSERT INTO async_updates(run_id, device, target, base_version, staleness, weight,"
            " num_examples, metrics, upload_id, body_sha256, body_path, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.run_id, device, target, base_version, staleness, weight, num_examples,
             json.dumps(dict(metrics)), upload_id, body_sha256, body_path, now))

    def get_async_update(self, device: str, upload_id: str) -> dict[str, Any] | None:
        return _decode_update(self._one(
            "SELECT * FROM async_updates WHERE run_id = ? AND device = ? AND upload_id = ?",
            (self.run_id, device, upload_id)))

    def pending_async_updates(self) -> list[dict[str, Any]]:
        """Updates not yet folded into a model version, oldest first."""
        return [_decode_update(r) for r in self._all(
            "SELECT * FROM async_updates WHERE run_id = ? AND folded = 0 ORDER BY id", (self.run_id,))]

    def fold_async_updates(self, target: int) -> None:
        self._exec("UPDATE async_updates SET folded = 1 WHERE run_id = ? AND target = ? AND folded = 0",
                   (self.run_id, target))

    def discard_pending_async_updates(self) -> None:
        """Forget the current run's updates not folded into a version (a run left for another:
        its buffers, and their files, are gone)."""
        self._exec("DELETE FROM async_updates WHERE run_id = ? AND folded = 0", (self.run_id,))

    def discard_async_updates(self, target: int) -> None:
        self._exec("DELETE FROM async_updates WHERE run_id = ? AND target = ? AND folded = 0",
                   (self.run_id, target))

    # device lifecycle ---------------------------------------------------
    def get_lifecycle(self, name: str) -> dict[str, Any] | None:
        return _decode_lifecycle(self._one("SELECT * FROM device_lifecycle WHERE name = ?", (name,)))

    def names_in_lifecycle_state(self, state: str) -> set[str]:
        rows = self._all("SELECT name FROM device_lifecycle WHERE state = ?", (state,))
        return {r["name"] for r in rows}

    def list_lifecycle(self) -> list[dict[str, Any]]:
        return [_decode_lifecycle(r) for r in self._all("SELECT * FROM device_lifecycle ORDER BY name")]

    def set_lifecycle(self, name: str, *, state: str, reason: str, round_number: int | None,
                      validation: Mapping[str, Any] | None, now: float) -> None:
        self._exec(
            "INSERT INTO device_lifecycle(name, state, reason, round, validation, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET state = excluded.state,"
            " reason = excluded.reason, round = excluded.round, validation = excluded.validation,"
            " updated_at = excluded.updated_at",
            (name, state, reason, round_number,
             None if validation is None else json.dumps(dict(validation)), now),
        )

    # device logs --------------------------------------------------------
    def add_logs(self, device: str, entries: list[Mapping[str, Any]], *, now: float, keep: int) -> None:
        """Insert a batch atomically, then forget the device's oldest lines beyond ``keep``."""
        with self.transaction():
            self._db.executemany(
                "INSERT INTO device_logs(device, level, message, time, round, received_at, run_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(device, e["level"], e["message"], e["time"], e["round"], now, self.run_id)
                 for e in entries])
            self._exec(
                "DELETE FROM device_logs WHERE device = ? AND id <= (SELECT id FROM device_logs"
                " WHERE device = ? ORDER BY id DESC LIMIT 1 OFFSET ?)", (device, device, keep))

    def list_logs(self, *, device: str | None = None, level: str | None = None,
                  round_number: int | None = None, after: int = 0, limit: int = 500,
                  run_id: int | None = None) -> list[dict[str, Any]]:
        """Oldest first, from id ``after`` on; every filter is optional. Round numbers start
        again in each run: a ``round_number`` means the current run's round (``run_id``: another's)."""
        where, params = ["id > ?"], [after]
        if round_number is not None and run_id is None:
            run_id = self.run_id
        for column, value in (("device", device), ("level", level), ("round", round_number),
                              ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        return self._all(
            f"SELECT id, device, level, message, time, round, received_at, run_id FROM device_logs"
            f" WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", (*params, limit))

    # checkpoints --------------------------------------------------------
    def checkpoint_path(self, number: int) -> Path:
        return self.checkpoint_dir / f"round_{number:05d}.safetensors"

    def write_checkpoint(self, number: int, weights: Mapping[str, np.ndarray]) -> Path:
        path = self.checkpoint_path(number)
        atomic_write_bytes(path, wire.encode(weights, wire.Meta(round=number, model_version=number)))
        return path

    def read_checkpoint(self, number: int) -> dict[str, np.ndarray]:
        weights, _ = wire.decode(self.checkpoint_path(number).read_bytes(), max_bytes=2**40)
        return weights

    def strategy_state_path(self, number: int) -> Path:
        return self.checkpoint_dir / f"round_{number:05d}.strategy.safetensors"

    def write_strategy_state(self, number: int, state: Mapping[str, np.ndarray],
                             strategy: Mapping[str, Any]) -> None:
        """The strategy's state after round ``number`` (FedAvgM's velocity, FedAdam's moments),
        beside that round's checkpoint and written the same atomic way; none when it is empty."""
        path = self.strategy_state_path(number)
        if not state:
            path.unlink(missing_ok=True)  # not another run's state for this round number
            return
        meta = wire.Meta(round=number, model_version=number)
        atomic_write_bytes(path, wire.encode(state, meta, extra={"strategy": json.dumps(dict(strategy))}))

    def read_strategy_state(self, number: int) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """``(state, {"name", "params"})`` saved with round ``number``, or None if it had none."""
        path = self.strategy_state_path(number)
        if not path.exists():
            return None
        body = path.read_bytes()
        state, _ = wire.decode(body, max_bytes=2**40)
        strategy = json.loads((wire.header(body).get("__metadata__") or {}).get("strategy", "{}"))
        return state, strategy

    def remove_checkpoints(self) -> None:
        """Remove the current run's checkpoints (a run starting from its initial model)."""
        for path in self.checkpoint_dir.glob("round_*.safetensors"):
            path.unlink(missing_ok=True)


class _Transaction:
    """Re-entrant: a transaction opened inside another joins it (the outermost commits)."""

    def __init__(self, storage: Storage, durable: bool = True) -> None:
        self._s = storage
        self._durable = durable

    def __enter__(self) -> None:
        self._s._lock.acquire()
        if self._s._depth == 0:
            try:
                if not self._durable:
                    self._s._db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync at commit
                self._s._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                if not self._durable:
                    self._s._db.execute("PRAGMA synchronous=FULL")
                self._s._lock.release()
                raise
        self._s._depth += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._s._depth -= 1
            if self._s._depth == 0:
                after, self._s._after = self._s._after, []
                try:
                    self._s._db.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    if not self._durable:
                        self._s._db.execute("PRAGMA synchronous=FULL")
                if not exc_type:
                    for action in after:
                        action()
        finally:
            self._s._lock.release()


def _decode_round(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    row["selected"] = json.loads(row["selected"])
    row["config"] = json.loads(row["config"])
    return row


def _decode_run(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    row["settings"] = json.loads(row["settings"]) if row["settings"] else None
    return row


def _decode_update(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    row["metrics"] = json.loads(row["metrics"])
    return row


def _decode_lifecycle(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    row["validation"] = json.loads(row["validation"]) if row["validation"] else None
    return row
