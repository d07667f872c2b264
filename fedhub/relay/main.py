"""``fedhub relay``: a relay for devices on another machine (a two-level deployment).

    fedhub relay --server http://server:4000 --port 4100 --name edge-1
    python device/device.py --server http://relay:4100 --name device1   # on the devices' side

Devices point at the relay as at the server. In rounds that take partial sums (FedAvg and its
server optimizers, and central DP, without secure aggregation or compression: the server's status
says ``partial_sums``) the relay folds its devices' updates into one sum (under central DP, of
their changes clipped to the round's norm) and sends that; in secure rounds it sums their masked
updates in the round's field and sends one masked sum; otherwise it passes every request on.
The enrollment secret comes from ``$FEDHUB_ENROLL_SECRET`` or ``--enroll-secret-file``; the
relay's own token is kept in ``--relay-dir``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from fedhub import state_dir as state
from fedhub.api.serving import ServeOptions, Serving
from fedhub.device.client import ServerError, TLSError, Unreachable, server_url
from fedhub.engine import partials
from fedhub.engine.auth import read_secret
from fedhub.engine.devices import check_name
from fedhub.engine.errors import InvalidInput
from fedhub.options.parser import Parser

from .app import create_relay_app
from .service import Relay


def parse_args(argv: list[str] | None = None):
    p = Parser(prog="fedhub relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="the FedHub server: http(s)://host:port")
    p.add_argument("--port", type=int, default=4100, help="port the devices connect to (default 4100)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--name", default="relay", help="the relay's name at the server (default: relay)")
    p.add_argument("--relay-dir", type=Path, default=None,
                   help="where the relay keeps its token and pending sums (default: relays/NAME in the "
                        "state directory's server folder: server_training/relays/NAME)")
    p.add_argument("--enroll-secret-file", type=Path, default=None,
                   help="file holding the enrollment secret (else $FEDHUB_ENROLL_SECRET, else the local "
                        "server's)")
    p.add_argument("--flush-after", type=float, default=2.0, metavar="SECONDS",
                   help="send a round's partial sum this long after its first update at the latest "
                        "(sooner once every device handed the round's task through the relay is in)")
    p.add_argument("--max-devices", type=int, default=partials.MAX_DEVICES,
                   help=f"devices in one partial sum at most (1-{partials.MAX_DEVICES})")
    p.add_argument("--threads", type=int, default=64, help="HTTP worker threads (long polls hold one each)")
    p.add_argument("--ca", help="CA bundle to verify the server's certificate")
    a = p.parse_args(argv)
    try:
        a.server = server_url(a.server)
        check_name(a.name)
    except (ValueError, InvalidInput) as exc:
        p.error(str(getattr(exc, "message", exc)))
    if not 0 <= a.port <= 65535:
        p.error(f"--port must be from 0 to 65535, got {a.port}")
    if a.flush_after <= 0:
        p.error(f"--flush-after must be positive, got {a.flush_after}")
    if not 1 <= a.max_devices <= partials.MAX_DEVICES:
        p.error(f"--max-devices must be from 1 to {partials.MAX_DEVICES}, got {a.max_devices}")
    if not 1 <= a.threads <= 1024:
        p.error(f"--threads must be from 1 to 1024, got {a.threads}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    layout = state.resolve(None)
    secret = os.environ.get("FEDHUB_ENROLL_SECRET")
    if a.enroll_secret_file is not None:
        secret = read_secret(a.enroll_secret_file)
        if secret is None:
            print(f"error: --enroll-secret-file {a.enroll_secret_file}: missing or empty", file=sys.stderr)
            return 2
    secret = secret or read_secret(layout.enroll_secret_file)
    folder = a.relay_dir or layout.server_dir / "relays" / a.name
    try:
        relay = Relay(a.server, a.name, state_dir=folder, enroll_secret=secret, verify=a.ca or True,
                      flush_after=a.flush_after, max_devices=a.max_devices)
    except ServerError as exc:
        print(f"error: the server refused relay {a.name!r}: {exc.body.get('message')}", file=sys.stderr)
        return 2
    except (Unreachable, TLSError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        serving = Serving(create_relay_app(relay), ServeOptions(host=a.host, port=a.port, threads=a.threads))
    except OSError as exc:
        print(f"error: cannot listen on {a.host}:{a.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    relay.start()
    print(f"FedHub relay {a.name!r} on {serving.url}, for {a.server}", flush=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serving.run()
    except KeyboardInterrupt:
        pass
    finally:
        serving.close()
        relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
