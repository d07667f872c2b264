"""Command-line flags that no other test used: each one reaches the setting it names (the
config the server, or the simulation, then runs with) and a bad value is refused in one line
naming the flag. In-process (``parse_args``), so in the fast tier: no process, no TensorFlow.

``--backend``, ``--ray-address``, ``--cpus-per-worker`` and ``--gpus-per-worker`` also run for
real in tests/test_ray_cli.py; ``--secagg-*`` and ``--dp`` with the Keras model in
tests/test_keras_live.py."""

from __future__ import annotations

import pytest

import fedhub.simulate as simulate
from fedhub import serve as server


def refused(parse, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_server_host_is_where_it_listens():
    config = server.parse_args(["4000", "--host", "0.0.0.0"])
    assert (config.host, config.port) == ("0.0.0.0", 4000)
    assert server.parse_args(["4000"]).host == "127.0.0.1"


@pytest.mark.parametrize("parse, base", [
    (server.parse_args, ["--min-devices", "5"]),
    (simulate.parse_args, ["--devices", "10", "--fraction", "0.5"]),
], ids=["server", "simulate"])
def test_secagg_shares_threshold_and_bits_reach_the_round(parse, base, capsys):
    a = parse([*base, "--secure-aggregation", "--secagg-shares", "3", "--secagg-threshold", "2",
               "--secagg-bits", "40"])
    secagg = (a if parse is server.parse_args else a.run).federation.secagg
    assert (secagg.shares, secagg.threshold, secagg.bits) == (3, 2, 40)
    assert "--secagg-bits" in refused(parse, [*base, "--secure-aggregation", "--secagg-bits", "8"], capsys)
    message = refused(parse, [*base, "--secure-aggregation", "--secagg-shares", "4"], capsys)
    assert "--secagg-shares" in message
    message = refused(parse, [*base, "--secure-aggregation", "--secagg-threshold", "9"], capsys)
    assert "at least 9 devices a round" in message


@pytest.mark.parametrize("parse, base", [
    (server.parse_args, ["--min-devices", "20"]),  # the adaptive bound's count noise needs a crowd
    (simulate.parse_args, ["--devices", "40", "--fraction", "0.5"]),
], ids=["server", "simulate"])
def test_dp_clip_lr_is_the_adaptive_bounds_learning_rate(parse, base, capsys):
    a = parse([*base, "--dp", "central-adaptive", "--dp-clip-norm-lr", "0.3"])
    privacy = (a if parse is server.parse_args else a.run).federation.dp
    assert (privacy.mode, privacy.clip_norm_lr) == ("central-adaptive", 0.3)
    assert parse([*base, "--dp", "central-adaptive", "--dp-clip-lr", "0.4"])  # the older spelling
    message = refused(parse, [*base, "--dp", "central-fixed", "--dp-clip-norm-lr", "0.3"], capsys)
    assert message == "error: --dp-clip-norm-lr applies to --dp=central-adaptive only"


def test_staleness_exponent_weights_async_updates(capsys):
    config = server.parse_args(["--mode", "async", "--staleness-exponent", "1"])
    assert config.federation.staleness_exponent == 1.0
    assert "--staleness-exponent" in refused(server.parse_args,
                                             ["--mode", "async", "--staleness-exponent", "-1"], capsys)


def test_simulate_ray_flags_reach_the_run(capsys):
    a = simulate.parse_args(["--backend", "ray", "--ray-address", "10.0.0.1:6379", "--cpus-per-worker", "2",
                             "--gpus-per-worker", "0.5"])
    assert (a.backend, a.ray_address) == ("ray", "10.0.0.1:6379")
    assert (a.cpus_per_worker, a.gpus_per_worker) == (2, 0.5)
    assert refused(simulate.parse_args, ["--cpus-per-worker", "0"], capsys) == \
        "error: --cpus-per-worker must be more than 0 and at most 1024, got 0"
    assert refused(simulate.parse_args, ["--gpus-per-worker", "-1"], capsys) == \
        "error: --gpus-per-worker must be at least 0 and at most 64, got -1"
    assert "invalid choice: 'dask'" in refused(simulate.parse_args, ["--backend", "dask"], capsys)
