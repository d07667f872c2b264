"""The one installed command, ``fedhub COMMAND``: each subcommand is the original entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedhub import cli
from tests.cli_inprocess import run_main


def test_no_command_or_an_unknown_one_is_one_error_line(capsys):
    assert cli.main([]) == 2
    assert cli.main(["bogus"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "'bogus'" in err[1] and "simulate" in err[1]


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


def test_a_subcommand_is_the_original_entry_point():
    from fedhub import split as format_dataset

    assert cli._entry("split") is format_dataset.main
    via_fedhub = run_main(cli.main, ["split", "--devices", "0"])
    direct = run_main(format_dataset.main, ["--devices", "0"])
    assert via_fedhub.code == direct.code == 2
    assert via_fedhub.stderr == direct.stderr and direct.stderr.startswith("error: ")


@pytest.mark.slow
def test_the_installed_script_splits_and_refuses(tmp_path, data_dir):
    script = Path(sys.executable).with_name("fedhub")
    assert script.exists(), "pip install -e . installs the fedhub command"
    done = subprocess.run([str(script), "split", "--devices", "2", "--out", str(tmp_path / "devices"),
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "devices").iterdir() if p.is_dir()) == ["device1", "device2"]
    bad = subprocess.run([str(script), "device", "notaport", "device1"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: "), bad.stderr
