"""``fedhub runs list|show|export|delete``: the runs a state directory keeps, read from it directly.

It needs no server (and works beside a running one: SQLite lets it read while the server
writes). ``export RUN DIR`` writes what a run is to take elsewhere: ``settings.json`` (its
complete settings), ``history.csv`` (a row per completed round, as ``eval/history.csv``) and
``model.safetensors`` (its final global model). ``delete RUN`` removes a run that is not the
state directory's current one, its rows and its folder; nothing else ever deletes a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from fedhub import state_dir as state
from fedhub.engine import history
from fedhub.engine.storage import Storage
from fedhub.options.parser import Parser


def _open(parser: Parser, state_dir: Path | None) -> Storage:
    folder = state.resolve(state_dir).server_dir
    if not (folder / "fedhub.sqlite3").is_file():
        parser.error(f"no FedHub state in {folder} (no fedhub.sqlite3; give --state-dir DIR)")
    try:
        return Storage(folder, scoped=False)
    except OSError as exc:
        parser.error(str(exc))
    raise AssertionError  # parser.error exits


def _find(parser: Parser, storage: Storage, key: str) -> dict[str, Any]:
    run = storage.find_run(key)
    if run is None:
        parser.error(f"no run {key!r} in {storage.state_dir} (fedhub runs list shows them)")
    return run


def _when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _current(storage: Storage) -> int | None:
    value = storage.get_setting("current_run")
    return int(value) if value else None


def list_runs(storage: Storage) -> str:
    """A table of the runs, newest first; ``*`` marks the current one."""
    current = _current(storage)
    rows = [("", "id", "name", "status", "rounds", "strategy", "created", "finished")]
    for run in storage.list_runs():
        settings = run["settings"] or {}
        total = settings.get("rounds")
        rounds = f"{run['completed_rounds']}/{total if total else 'unlimited'}" if total is not None \
            else str(run["completed_rounds"])
        rows.append(("*" if run["id"] == current else "", str(run["id"]), run["name"], run["status"], rounds,
                     str(settings.get("strategy", "?")), _when(run["created_at"]), _when(run["finished_at"])))
    if len(rows) == 1:
        return "no runs yet"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def show_run(storage: Storage, run: dict[str, Any]) -> str:
    """The run as JSON: id, name, status, times, settings and each completed round's metrics."""
    rounds = [{k: e.get(k) for k in history.COLUMNS} for e in storage.run_history(run["id"])]
    view = {"id": run["id"], "name": run["name"], "status": run["status"],
            "current": run["id"] == _current(storage), "created_at": run["created_at"],
            "finished_at": run["finished_at"], "folder": str(storage.run_folder(run)),
            "settings": run["settings"], "rounds": rounds}
    return json.dumps(view, indent=2)


def export_run(parser: Parser, storage: Storage, run: dict[str, Any], out: Path) -> list[Path]:
    """settings.json, history.csv and model.safetensors (the last completed round's global model)
    in ``out``, which must be new or empty."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} exists and is not an empty folder; give a new one")
    last = storage.last_round(run["id"])
    model = storage.run_folder(run) / "saved" / f"round_{last:05d}.safetensors"
    if not model.is_file():
        parser.error(f"run {run['id']}'s final model {model} is missing")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "settings.json", out / "history.csv", out / "model.safetensors"]
    settings = {"run": {"id": run["id"], "name": run["name"], "status": run["status"],
                        "completed_rounds": last}, "settings": run["settings"]}
    written[0].write_text(json.dumps(settings, indent=2) + "\n")
    history.write_csv(written[1], storage.run_history(run["id"]))
    shutil.copyfile(model, written[2])
    return written


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="fedhub runs", description=__doc__.split("\n\n")[0])
    state.add_option(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="every run, newest first (* marks the current one)")
    show = sub.add_parser("show", help="one run's settings and history, as JSON")
    export = sub.add_parser("export", help="write a run's settings.json, history.csv and final model to DIR")
    delete = sub.add_parser("delete", help="remove a run that is not the current one, and its files")
    for command in (show, export, delete):
        command.add_argument("run", metavar="RUN", help="the run's id or name")
    for command in (sub.choices["list"], show, export, delete):  # before or after the command
        state.add_option(command, default=argparse.SUPPRESS)
    export.add_argument("out", type=Path, metavar="DIR", help="a new or empty folder")
    a = p.parse_args(argv)
    if a.command is None:
        p.error("give a command: list, show, export or delete")
    storage = _open(p, a.state_dir)
    try:
        if a.command == "list":
            print(list_runs(storage))
            return 0
        run = _find(p, storage, a.run)
        if a.command == "show":
            print(show_run(storage, run))
        elif a.command == "export":
            for path in export_run(p, storage, run, a.out):
                print(path)
        else:
            if run["id"] == _current(storage):
                p.error(f"run {run['id']} {run['name']!r} is the state directory's current run; start "
                        "another run first (server.py starts one, or POST /api/runs)")
            storage.delete_run(run["id"])
            print(f"deleted run {run['id']} {run['name']!r}")
    finally:
        storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
