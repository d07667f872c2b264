"""Clean run-time state on purpose (never at start-up): ``python -m fedhub.cleaner [--state-dir DIR]``."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedhub import state_dir as state
from fedhub.options.parser import Parser

KEEP = {".gitkeep"}
SECRETS = {state.ENROLL_SECRET_FILE, state.ADMIN_TOKEN_FILE}


def _empty(folder: Path, keep: set[str]) -> list[Path]:
    removed = []
    if not folder.exists():
        return removed
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def clean_server_state(state_dir: Path, eval_dir: Path, *, keep_secrets: bool = True) -> list[Path]:
    """Remove the database, checkpoints and history; the secrets stay unless asked.

    A state directory also holds the run's ``devices/`` (their data) and ``runs/``
    (TensorBoard): those are not the server's state and stay."""
    keep = KEEP | set(state.SUBFOLDERS) | (SECRETS if keep_secrets else set())
    # Each run after a state directory's first keeps its files in runs/<id>-<name>/ (beside
    # TensorBoard's run folders, which stay): they go with the database that lists them.
    runs = state_dir / "runs"
    folders = [f for f in runs.iterdir() if (f / "saved").is_dir()] if runs.is_dir() else []
    for folder in folders:
        shutil.rmtree(folder)
    return folders + _empty(state_dir, keep) + _empty(eval_dir, KEEP)


def clean_devices(devices_root: Path, *, keep_data: bool = True) -> list[Path]:
    """Remove devices' histories, models and tokens; their data stays unless asked."""
    removed: list[Path] = []
    if not devices_root.exists():
        return removed
    for device in devices_root.iterdir():
        if not device.is_dir():
            continue
        keep = {"data"} if keep_data else set()
        removed += _empty(device, keep)
    return removed


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fedhub.cleaner", description=__doc__)
    state.add_option(p)
    p.add_argument("--eval-dir", type=Path, default=None, help="default: the state directory's eval/")
    p.add_argument("--devices-root", type=Path, default=None,
                   help="default: the state directory's devices/")
    p.add_argument("--secrets", action="store_true", help="also remove the admin token and secret")
    p.add_argument("--device-data", action="store_true", help="also remove the devices' data")
    a = p.parse_args(argv)
    layout = state.resolve(a.state_dir)
    removed = clean_server_state(layout.server_dir, a.eval_dir or layout.eval_dir,
                                 keep_secrets=not a.secrets)
    removed += clean_devices(a.devices_root or layout.devices_root, keep_data=not a.device_data)
    print(f"removed {len(removed)} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
