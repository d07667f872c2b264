"""One importable package: a wheel built from the checkout installs the single top-level name
``fedhub`` (the top-level scripts are the checkout's entry points, not modules of the wheel),
and no file edits ``sys.path`` to find it."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


# Folders of the checkout that hold no code of ours (installed packages, run-time state, wheels).
NOT_CODE = {".git", ".venv", "node_modules", "build", "wheels", "server_training", "eval", "devices",
            "runs", "vendor", "__pycache__", ".pytest_cache", ".ruff_cache"}


def python_files() -> list[Path]:
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [s for s in subfolders if s not in NOT_CODE and not s.endswith(".egg-info")]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return found


@pytest.mark.slow  # builds a wheel in a child process
def test_the_wheel_installs_only_fedhub(tmp_path):
    source = tmp_path / "source"
    for path in tracked_files():  # the checkout as a clean clone has it, built away from the tree
        if path.is_file():
            target = source / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--wheel-dir", str(tmp_path / "dist"), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fedhub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"fedhub"}, sorted(top)
    for needed in ("fedhub/__init__.py", "fedhub/engine/rounds.py", "fedhub/api/openapi.json",
                   "fedhub/device/main.py", "fedhub/dashboard/page.py", "fedhub/frameworks/torch.py"):
        assert needed in names, needed
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fedhub"]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fedhub = fedhub.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def sys_path_edits(path: Path) -> list[int]:
    """Lines of ``path`` that change ``sys.path`` (insert, append, extend, remove, assignment)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t.value if isinstance(t, ast.Subscript) else t for t in targets), None)
        if (isinstance(target, ast.Attribute) and target.attr == "path"
                and isinstance(target.value, ast.Name) and target.value.id == "sys"):
            found.append(node.lineno)
    return found


def test_no_file_edits_sys_path(tmp_path):
    files = python_files()
    assert ROOT / "fedhub" / "engine" / "rounds.py" in files and ROOT / "bench" / "load.py" in files
    edits = {f"{path.relative_to(ROOT)}:{line}" for path in files for line in sys_path_edits(path)}
    assert edits == set()
    probe = tmp_path / "probe.py"  # the scan sees each form
    path = "sys" + ".path"  # spelt in two, so that no scan of this file sees an edit here
    probe.write_text(f"import sys\n{path}.insert(0, 'x')\n{path}.append('y')\n{path}[:0] = ['z']\n"
                     f"{path} += ['w']\nprint({path})\n")
    assert sorted(sys_path_edits(probe)) == [2, 3, 4, 5]


def test_bench_imports_nothing_from_the_tests():
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []


@pytest.mark.parametrize("name", ["keras", "torch"])
def test_a_framework_whose_extra_is_missing_is_one_line_naming_the_extra(monkeypatch, name):
    import importlib.util

    from fedhub import frameworks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))
    with pytest.raises(ValueError, match=rf"^--framework {name} needs {name}, which is not installed: "
                                         rf"pip install 'fedhub\[{name}\]'"):
        frameworks.get(name)
