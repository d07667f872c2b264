"""The engine stays free of web and TensorFlow code, so it is reusable and tests in milliseconds."""

import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_engine_imports_neither_flask_nor_tensorflow():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in (ROOT / "fedcore").rglob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('flask', 'werkzeug', 'tensorflow', 'keras', 'requests', 'api', "
              "'model', 'device') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert len(modules) >= 8


def test_engine_never_reaches_up_into_the_http_layer():
    for path in Path(ROOT / "fedcore").rglob("*.py"):
        text = path.read_text()
        for layer in ("api", "server", "fedhub", "model", "device"):
            layer = f"from {layer} import"
            assert layer not in text, f"{path.name}: {layer}"
