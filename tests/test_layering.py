"""The engine stays free of web and ML-framework code, so it is reusable and tests in milliseconds."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

ENGINE = ROOT / "fedhub" / "engine"
# Third-party packages the engine must never import, at module level or inside a function.
FORBIDDEN = ("flask", "werkzeug", "tensorflow", "keras", "torch", "requests", "streamlit")
# Of the package, the engine may import itself and what `import fedhub` runs (TensorFlow's log
# settings); never the HTTP layer, the device runtime, the frameworks or the dashboards.
ALLOWED_FEDHUB = ("fedhub", "fedhub.engine", "fedhub.tensorflow_env")


def imported_modules(path: Path) -> set[str]:
    """The dotted name of every ``import X`` and ``from X import ...`` in ``path`` (relative
    imports stay inside the engine and are left out)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def forbidden(module: str) -> bool:
    if module.split(".")[0] in FORBIDDEN:
        return True
    return (module == "fedhub" or module.startswith("fedhub.")) and not (
        module in ALLOWED_FEDHUB or module.startswith("fedhub.engine."))


@pytest.mark.slow  # a fresh interpreter: what importing every engine module pulls in, transitively
def test_engine_imports_neither_flask_nor_tensorflow():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in ENGINE.rglob("*.py"))
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if forbidden(m)] == []
    assert len(modules) >= 8


def test_engine_never_reaches_up_into_the_http_layer():
    paths = sorted(ENGINE.rglob("*.py"))
    assert len(paths) >= 8
    offenders = {f"{path.relative_to(ROOT)}: {module}"
                 for path in paths for module in imported_modules(path) if forbidden(module)}
    assert offenders == set()


def test_the_import_scan_sees_both_import_forms(tmp_path):
    """The scan above would pass vacuously if it missed a form: it sees ``import X``,
    ``import X.Y as Z``, ``from X import Y`` and imports inside functions."""
    probe = tmp_path / "probe.py"
    probe.write_text("import flask\nimport tensorflow.keras as tk\nfrom fedhub.api import app\n"
                     "from . import wire\n\ndef later():\n    import fedhub.device.runner\n")
    assert imported_modules(probe) == {"flask", "tensorflow.keras", "fedhub.api", "fedhub.device.runner"}
    assert [m for m in sorted(imported_modules(probe)) if forbidden(m)] == [
        "fedhub.api", "fedhub.device.runner", "flask", "tensorflow.keras"]
    assert not forbidden("fedhub.engine.wire") and not forbidden("fedhub.tensorflow_env")
