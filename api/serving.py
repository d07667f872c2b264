"""Serve the Flask app with a production WSGI server.

Plain HTTP goes through waitress. waitress has no TLS, so when given a
certificate and key the app is served by cheroot (CherryPy's server) with
Python's ssl module instead; in production a reverse proxy usually terminates
TLS in front of waitress (see the README).
"""

from __future__ import annotations

import ctypes
import platform
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 4000
    threads: int = 32
    max_body_bytes: int = 65 * 1024 * 1024
    # Seconds a connection may sit idle or trickle its request before it is closed (slow-loris).
    channel_timeout: float = 30.0
    certfile: Path | None = None
    keyfile: Path | None = None
    # Open connections before waitress stops accepting. Every device keeps a keep-alive
    # connection (a few while it trains); at waitress's default of 100, device 101 and on
    # wait in the listen backlog until they time out, and a round needing them never opens.
    connection_limit: int = 1000


# Request and response bodies above this go through a temporary file rather than memory.
# waitress reads a whole request before a worker thread takes it, and keeps a whole response
# until the client has read it: held in memory, N devices uploading or downloading the model
# at once would cost N x the model's size, whatever the thread count.
SPOOL_BYTES = 64 * 1024
# glibc keeps a freed block of up to 32 MB for reuse in the arena of the thread that freed
# it, once it has seen such a block: every worker thread would keep its largest burst of
# model-sized buffers (a body, its tensors, a float64 sum term: ~5 x the model) resident.
# A fixed threshold hands blocks above it back to the system when freed: 200 devices
# against 32 threads then cost +36 MiB at peak instead of +61 MiB (docs/benchmarks.md).
# (M_MMAP_THRESHOLD is -3 in glibc's malloc.h.)
MMAP_THRESHOLD = 128 * 1024


def _release_large_blocks() -> None:
    """Freed model-sized buffers go back to the system at once (glibc only; else nothing)."""
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD)


class Serving:
    """A bound server: ``url``, then ``run()`` (blocks) and ``close()``, or ``start()`` (a
    background thread) and ``stop()``."""

    def __init__(self, app: Flask, options: ServeOptions) -> None:
        self.options = options
        self.tls = options.certfile is not None
        engine = app.extensions.get("fedhub")
        if engine is not None:  # long polls may hold half the worker threads, never all of them
            engine.max_waiters = max(1, options.threads // 2)
        _release_large_blocks()
        if self.tls:
            self._server = _cheroot(app, options)
            port = self._server.bind_addr[1]
        else:
            from waitress import create_server

            self._server = create_server(
                app, host=options.host, port=options.port, threads=options.threads,
                max_request_body_size=options.max_body_bytes, channel_timeout=options.channel_timeout,
                cleanup_interval=min(30, max(1, int(options.channel_timeout))), ident="fedhub",
                # poll(), as select() cannot watch file descriptors above 1023.
                connection_limit=options.connection_limit, asyncore_use_poll=True,
                inbuf_overflow=SPOOL_BYTES, outbuf_overflow=SPOOL_BYTES)
            port = self._server.effective_port
        self.port = int(port)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://{options.host}:{self.port}"

    def run(self) -> None:
        if self.tls:
            self._server.serve()
        else:
            self._server.run()

    def close(self) -> None:
        if self.tls:
            self._server.stop()
        else:
            self._server.close()

    def start(self) -> None:
        """Serve on a background thread of this process (``fedhub.Server``); see :meth:`stop`."""
        self._thread = threading.Thread(target=self.run, name="fedhub-http", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End serving started with :meth:`start`: connections close, the worker threads end."""
        if self.tls:
            self._server.stop()
        else:
            from waitress import wasyncore

            # Closing the sockets from inside waitress' own loop lets the loop end cleanly.
            self._server.trigger.pull_trigger(lambda: wasyncore.close_all(self._server._map))
        self._thread.join(timeout)
        if not self.tls:
            self._server.task_dispatcher.shutdown()


def _cheroot(app: Flask, options: ServeOptions) -> Any:
    from cheroot.ssl.builtin import BuiltinSSLAdapter
    from cheroot.wsgi import Server

    if options.keyfile is None:
        raise ValueError("--certfile needs --keyfile")
    for path in (options.certfile, options.keyfile):
        if not Path(path).is_file():
            raise ValueError(f"TLS file not found: {path}")
    server = Server((options.host, options.port), app, numthreads=options.threads,
                    timeout=int(options.channel_timeout), server_name="fedhub")
    adapter = BuiltinSSLAdapter(str(options.certfile), str(options.keyfile))
    adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
    server.ssl_adapter = adapter
    server.max_request_body_size = options.max_body_bytes
    server.prepare()  # binds now, so the port is known and errors surface before serving
    return server
