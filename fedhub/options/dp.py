"""The ``--dp`` command-line options, shared by ``server.py`` and ``python -m fedhub.simulate``."""

from __future__ import annotations

import argparse

from fedhub.engine import params
from fedhub.engine.privacy import DP_MODES, DPConfig

# Each option and the DPConfig setting it fills (the defaults live in DPConfig).
_FLAGS = {"noise_multiplier": "--dp-noise-multiplier", "clipping_norm": "--dp-clip",
          "delta": "--dp-delta", "max_epsilon": "--dp-max-epsilon",
          "target_quantile": "--dp-target-quantile", "clip_norm_lr": "--dp-clip-lr",
          "clipped_count_stddev": "--dp-clipped-count-stddev"}


def add_dp_options(p: argparse.ArgumentParser) -> None:
    d = DPConfig()
    g = p.add_argument_group("differential privacy")
    g.add_argument("--dp", choices=DP_MODES, default=None,
                   help="central-fixed / central-adaptive: the server clips each update (fixed "
                        "bound, or one that follows a quantile of the norms) and noises the mean; "
                        "local: each device clips and noises its own update before uploading; "
                        "distributed (needs --secure-aggregation): each device clips its update and "
                        "adds its share of the noise before masking")
    g.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help=f"noise standard deviation over the clipping bound (default {d.noise_multiplier})")
    g.add_argument("--dp-clip", type=float, default=None,
                   help=f"L2 clipping bound of each update's change; the first bound for "
                        f"central-adaptive (default {d.clipping_norm})")
    g.add_argument("--dp-delta", type=float, default=None,
                   help=f"delta at which epsilon is reported (default {d.delta:g})")
    g.add_argument("--dp-max-epsilon", type=float, default=None,
                   help="privacy budget: the run stops before a round that would spend more")
    g.add_argument("--dp-target-quantile", type=float, default=None,
                   help=f"central-adaptive: share of updates left unclipped (default {d.target_quantile})")
    g.add_argument("--dp-clip-lr", type=float, default=None,
                   help=f"central-adaptive: learning rate of the bound (default {d.clip_norm_lr})")
    g.add_argument("--dp-clipped-count-stddev", type=float, default=None,
                   help="central-adaptive: noise on the count of unclipped updates "
                        "(default devices per round / 20)")


def dp_config(p: argparse.ArgumentParser, a: argparse.Namespace, devices_per_round: int) -> DPConfig | None:
    """The run's DPConfig from the options (None without ``--dp``); a bad value is a one-line
    ``error: ...`` naming its option (exit 2)."""
    given = {key: getattr(a, flag[2:].replace("-", "_")) for key, flag in _FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if a.dp is None:
        if given:
            p.error(f"{_FLAGS[next(iter(given))]} needs --dp {'|'.join(DP_MODES)}")
        return None
    config = DPConfig(mode=a.dp, **given)
    if a.dp != "central-adaptive":
        extra = [k for k in ("target_quantile", "clip_norm_lr", "clipped_count_stddev") if k in given]
        if extra:
            p.error(f"{_FLAGS[extra[0]]} applies to --dp central-adaptive only")
    try:
        from fedhub.engine.strategies import FedAvg

        config.wrap(FedAvg(), devices_per_round)  # its own checks and messages first
        params.check_numbers(config)  # then every number in the range DPConfig declares
    except ValueError as exc:
        message = str(exc)
        for key, flag in _FLAGS.items():
            message = message.replace(key, flag)
        p.error(message.replace("dp mode", "--dp").replace("dp --", "--"))
    return config
