"""The engine stays free of web and TensorFlow code, so it is reusable and tests in milliseconds."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

# Top-level packages the engine (fedcore/) must never import, at module level or inside a function.
FORBIDDEN = ("flask", "werkzeug", "tensorflow", "keras", "requests", "api", "server", "fedhub",
             "model", "device", "global_model", "server_tensorboard", "dashboard", "dashboard_stats")


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every ``import X`` and ``from X import ...`` in ``path`` (relative
    imports stay inside fedcore and are left out)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.slow  # a fresh interpreter: what importing every engine module pulls in, transitively
def test_engine_imports_neither_flask_nor_tensorflow():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in (ROOT / "fedcore").rglob("*.py"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('flask', 'werkzeug', 'tensorflow', 'keras', 'requests', 'api', "
              "'model', 'device') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert len(modules) >= 8


def test_engine_never_reaches_up_into_the_http_layer():
    paths = sorted((ROOT / "fedcore").rglob("*.py"))
    assert len(paths) >= 8
    offenders = {f"{path.relative_to(ROOT)}: {package}"
                 for path in paths for package in imported_packages(path) & set(FORBIDDEN)}
    assert offenders == set()


def test_the_import_scan_sees_both_import_forms(tmp_path):
    """The scan above would pass vacuously if it missed a form: it sees ``import X``,
    ``import X.Y as Z``, ``from X import Y`` and imports inside functions."""
    probe = tmp_path / "probe.py"
    probe.write_text("import flask\nimport tensorflow.keras as tk\nfrom api import app\n"
                     "from . import wire\n\ndef later():\n    import device.runner\n")
    assert imported_packages(probe) == {"flask", "tensorflow", "api", "device"}
