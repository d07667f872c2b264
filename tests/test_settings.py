"""Each setting declared once (issue 20, section 3): the flags of ``server.py`` and ``python -m
fedhub.simulate``, a ``--config`` file's keys, ``fedhub.Server``'s keywords and the README's table
all come from the config dataclasses' fields, and every refusal names the setting the way its
front end spells it. In-process and fast, except one real ``server.py`` per refusal kind."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fedhub.simulate as simulate
from fedhub import serve as server
from fedhub import settings
from fedhub.engine.config import FederationConfig
from fedhub.engine.params import SettingError

from .cli_inprocess import assert_one_line_error, run_main
from .conftest import ROOT

EVERY = settings.settings_of(server.ServerConfig)
# server.py's flags that are not settings of the run (each said why in serve.parse_args)
NOT_SETTINGS = {"-h", "--help", "--config", "--print-config", "--list-strategies", "--log-level"}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string the parser takes, hidden aliases and --no- forms left out."""
    return {option for action in parser._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings if not option.startswith("--no-")}


def _server_parser() -> argparse.ArgumentParser:
    parsers = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            server.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return parsers[0]


# --------------------------------------------------------------------------- one declaration


def test_every_setting_has_a_flag_and_every_run_flag_is_a_setting():
    flags = _flags(_server_parser()) - NOT_SETTINGS
    assert flags == {s.flag for s in EVERY}
    for s in EVERY:
        assert s.param.help, f"{s.path} has no help text"
        if s.switch or s.path == "strategy_params":  # declared: --dp, --secure-aggregation, --strategy-arg
            continue
        assert s.flag == "--" + s.path.replace(".", "-").replace("_", "-"), s


def test_one_name_per_setting_with_the_older_spellings_hidden():
    assert {s.path: s.aliases for s in EVERY if s.aliases} == {
        "buffer_size": ("--buffer",), "dp.clipping_norm": ("--dp-clip",),
        "dp.clip_norm_lr": ("--dp-clip-lr",), "secagg.clip_range": ("--secagg-clip",)}
    new = server.parse_args(["--mode", "async", "--buffer-size", "4"])
    old = server.parse_args(["--mode", "async", "--buffer", "4"])
    assert new.federation.buffer_size == old.federation.buffer_size == 4
    assert "--buffer " not in server.ServerConfig.__doc__ + (simulate.__doc__ or "")


def test_simulate_takes_the_shared_settings_with_its_own_defaults_declared_once():
    o = simulate.parse_args([])
    assert (o.run.federation.rounds, o.run.federation.fraction) == (5, 0.1)  # simulate.DEFAULTS
    assert o.run.federation.buffer_size == FederationConfig().buffer_size  # the rest: the fields'
    o = simulate.parse_args(["--devices", "20", "--buffer-size", "3", "--mode", "async", "--seed", "7"])
    assert (o.devices, o.run.federation.buffer_size, o.run.federation.seed) == (20, 3, 7)
    shared = {s.flag for s in simulate._settings()} & {s.flag for s in EVERY}
    assert {"--rounds", "--epochs", "--dp", "--secure-aggregation", "--max-staleness"} <= shared
    assert not shared & {"--port", "--threads", "--min-devices", "--quorum"}


# --------------------------------------------------------------------------- errors name the setting


def test_the_python_api_names_max_staleness_and_the_command_line_its_flag(tmp_path):
    import fedhub

    with pytest.raises(ValueError, match=r"^max_staleness must be at least 0 and at most 10000, got -1$"):
        fedhub.Server("basic", max_staleness=-1, state_dir=tmp_path / "s")
    outcome = run_main(server.parse_args, ["--max-staleness", "-1"])
    assert_one_line_error(outcome, "--max-staleness must be at least 0 and at most 10000, got -1")
    outcome = run_main(simulate.parse_args, ["--max-staleness", "-1"])
    assert_one_line_error(outcome, "--max-staleness must be at least 0")


def test_a_setting_error_carries_its_paths_and_renders_per_front_end():
    with pytest.raises(SettingError) as refused:
        FederationConfig(mode="async", compress_downlink=True, training=dataclasses.replace(
            FederationConfig().training, compression="q8")).validate()
    assert refused.value.settings == ("mode", "compress_downlink")
    assert str(refused.value).startswith("asynchronous mode (mode=async) cannot use compress_downlink")
    assert settings.cli_message(refused.value).startswith(
        "asynchronous mode (--mode=async) cannot use --compress-downlink")


def test_unknown_keywords_name_the_close_matches(tmp_path):
    import fedhub

    with pytest.raises(ValueError, match=r"unknown setting bufer_size \(did you mean buffer_size"):
        fedhub.Server("basic", bufer_size=3, state_dir=tmp_path / "s")
    with pytest.raises(ValueError, match=r"unknown setting secagg\.clip \(did you mean clip_range"):
        fedhub.Server("basic", secagg={"clip": 1.0}, state_dir=tmp_path / "s")


def test_secure_aggregation_is_one_name_in_python(tmp_path):
    import fedhub

    server_ = fedhub.Server("basic", secagg=True, min_devices=2, state_dir=tmp_path / "s")
    assert server_.federation.secagg is not None
    with pytest.warns(DeprecationWarning, match="secure_aggregation= is now secagg="):
        old = fedhub.Server("basic", secure_aggregation=True, min_devices=2, state_dir=tmp_path / "t")
    assert old.federation.secagg == server_.federation.secagg


# --------------------------------------------------------------------------- --config and --print-config


def _printed(parse, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        parse([*argv, "--print-config"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("parse, argv", [
    (server.parse_args, ["--min-devices", "20", "--buffer-size", "4", "--dp", "central-adaptive",
                         "--dp-clip-norm-lr", "0.3", "--strategy", "fedavgm",
                         "--strategy-arg", "server_momentum=0.5", "--no-tensorboard", "--quorum", "0.75"]),
    (server.parse_args, ["--min-devices", "3", "--secure-aggregation", "--secagg-bits", "40",
                         "--max-upload-mb", "8.5", "--test-limit", "100"]),
    (simulate.parse_args, ["--devices", "30", "--split", "dirichlet", "--dp", "local", "--epochs", "2"]),
], ids=["server-dp", "server-secagg", "simulate"])
def test_print_config_reads_back_to_the_same_settings(parse, argv, tmp_path, capsys):
    text = _printed(parse, argv, capsys)
    (tmp_path / "run.toml").write_text(text)
    again = _printed(parse, ["--config", str(tmp_path / "run.toml")], capsys)
    assert again == text
    assert parse(["--config", str(tmp_path / "run.toml")]) == parse(argv)


def test_flags_override_the_file_and_groups_merge_key_by_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nquorum = 0.25\nstart = true\n\n[dp]\nmode = "local"\nclipping_norm = 2.0\n'
                    '\n[strategy_params]\nserver_momentum = 0.5\n')
    config = server.parse_args(["--config", str(path), "--rounds", "9", "--dp-delta", "1e-6", "--no-start",
                                "--strategy", "fedavgm"])
    f = config.federation
    assert (f.rounds, f.quorum, f.start) == (9, 0.25, False)
    assert (f.dp.mode, f.dp.clipping_norm, f.dp.delta) == ("local", 2.0, 1e-6)
    assert f.strategy_params == {"server_momentum": 0.5}


@pytest.mark.parametrize("text, message", [
    ("buffer = 3\n", "unknown setting buffer (did you mean buffer_size?)"),
    ("max_staleness = \"3\"\n", "max_staleness must be an integer, got '3'"),
    ("max_staleness = -1\n", "max_staleness must be at least 0 and at most 10000, got -1"),
    ("[dp]\nclip = 1.0\n", "unknown setting dp.clip"),
    ("[secagg]\nbits = 8\n", "secagg.bits must be at least 16 and at most 64, got 8"),
    ("port = 80\n", "unknown setting port"),  # simulate: the server's own settings are not its
    ("rounds = \n", "not TOML"),
])
def test_a_bad_file_is_one_error_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    parse = simulate.parse_args if "port" in text else server.parse_args
    assert_one_line_error(run_main(parse, ["--config", str(path)]), f"{path}: {message}")


def test_a_group_setting_without_its_switch_is_refused_unless_the_file_switches_it_on(tmp_path):
    assert_one_line_error(run_main(server.parse_args, ["--secagg-bits", "40"]),
                          "--secagg-bits needs --secure-aggregation")
    path = tmp_path / "run.toml"
    path.write_text("min_devices = 3\n\n[secagg]\n")
    assert server.parse_args(["--config", str(path), "--secagg-bits", "40"]).federation.secagg.bits == 40


@pytest.mark.slow
def test_server_py_refuses_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_stalenes = 3\n")
    out = subprocess.run([sys.executable, "server.py", "--config", str(bad)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "FEDHUB_STATE_DIR": str(tmp_path / "s")})
    assert out.returncode == 2, out
    assert out.stderr == f"error: {bad}: unknown setting max_stalenes (did you mean max_staleness?)\n"
    assert out.stdout == "" and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- the README


def test_the_readme_options_table_is_the_declared_settings():
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- generated by fedhub\.settings\.markdown_table[^\n]*-->\n(.*?)<!-- end of "
                      r"generated table -->", text, re.S)
    assert match, "README.md's Server options table is missing its markers"
    assert match.group(1) == settings.markdown_table(EVERY), (
        "README.md's options table differs from the declared settings: paste "
        "fedhub.settings.markdown_table(settings_of(ServerConfig))")


def test_the_readme_shows_a_config_file_example():
    text = (ROOT / "README.md").read_text()
    assert "--print-config > run.toml" in text and "--config run.toml" in text
    assert Path(ROOT / "fedhub" / "settings.py").is_file()


def test_a_folder_given_as_a_path_is_kept_as_the_string_the_setting_holds():
    from fedhub import settings
    from fedhub.serve import ServerConfig

    config = settings.build(ServerConfig, {"data_dir": Path("some/data")})
    assert config.data_dir == os.fspath(Path("some/data"))


def test_an_empty_host_is_refused_not_bound_to_every_interface(capsys):
    """``--host ''`` would make waitress listen on every interface; the default is the loopback."""
    from fedhub import serve

    with pytest.raises(SystemExit) as exited:
        serve.parse_args(["--host", ""])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --host must name an interface (0.0.0.0 for every "
                                               "one), got an empty string")
