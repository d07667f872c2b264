"""``fedhub COMMAND [ARGS]``: one installed command for every entry point.

Each subcommand runs the same ``main(argv)`` as the original forms (``python server.py 4000``,
``python device/device.py 4000 device1``, ``python utils/format_dataset.py``,
``python -m fedhub.simulate``), so options, refusals and exit codes are the same whichever form a
user types; the module of a subcommand is imported only when it is chosen (``fedhub device`` in a PyTorch
federation imports no TensorFlow).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable

# subcommand -> (module, what it does); each module has ``main(argv) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "server": ("fedhub.serve", "run the federation server (python server.py PORT ...)"),
    "device": ("fedhub.device.main", "run one device (python device/device.py PORT NAME ...)"),
    "split": ("fedhub.split", "split a data set over devices' folders"),
    "simulate": ("fedhub.simulate", "simulate many devices on a pool of workers"),
    "relay": ("fedhub.relay.main", "a relay between devices and the server (a two-level deployment)"),
    "demo": ("fedhub.demo", "a real federated run: split, server, devices, rounds"),
    "clean": ("fedhub.cleaner", "remove run-time state"),
    "runs": ("fedhub.runs_cli", "list, show, export or delete the runs a state directory keeps"),
    "dashboard": ("", "the Streamlit control dashboard (streamlit run dashboard/index.py)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: fedhub COMMAND [ARGS]   (fedhub COMMAND --help for its options)\n\ncommands:\n{rows}"


def _dashboard(argv: list[str]) -> int:
    """Streamlit runs a script file, not a function: hand it the page's file (a checkout's
    ``dashboard/index.py`` runs the same page) and the rest."""
    script = importlib.util.find_spec("fedhub.dashboard.page").origin  # found, not imported
    return subprocess.call([sys.executable, "-m", "streamlit", "run", str(script), *argv],
                           env=os.environ.copy())


def _entry(command: str) -> Callable[[list[str]], int]:
    if command == "dashboard":
        return _dashboard
    return importlib.import_module(COMMANDS[command][0]).main


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"error: give a command: {', '.join(COMMANDS)} (fedhub --help says what each does)",
              file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return int(_entry(command)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
