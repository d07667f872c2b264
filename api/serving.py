"""Serve the Flask app with a production WSGI server.

Plain HTTP goes through waitress. waitress has no TLS, so when given a
certificate and key the app is served by cheroot (CherryPy's server) with
Python's ssl module instead; in production a reverse proxy usually terminates
TLS in front of waitress (see the README). waitress is used through three small
subclasses (below) so that its own errors are JSON and slow-loris clients cannot
hold its connections; cheroot's own errors are made JSON by two more.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask
from waitress.adjustments import Adjustments
from waitress.buffers import OverflowableBuffer
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.receiver import FixedStreamReceiver
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from .errors import error_body


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 4000
    threads: int = 32
    max_body_bytes: int = 65 * 1024 * 1024
    # Seconds a connection may sit idle or trickle its request before it is closed (slow-loris).
    channel_timeout: float = 30.0
    # Seconds a connection has to send its request line and headers, however steadily it
    # trickles them; a client sends them in one go, only a slow-loris attack takes longer.
    header_timeout: float = 10.0
    certfile: Path | None = None
    keyfile: Path | None = None
    # Open connections at which the least recently active idle ones are closed to make room.
    # Every device keeps a keep-alive connection (a few while it trains); at waitress's default
    # of 100, device 101 and on would wait in the listen backlog until they time out.
    connection_limit: int = 1000


# Request and response bodies above this go through a temporary file rather than memory.
# waitress reads a whole request before a worker thread takes it, and keeps a whole response
# until the client has read it: held in memory, N devices uploading or downloading the model
# at once would cost N x the model's size, whatever the thread count. (The model download is
# sent straight from the engine's bytes, through the file wrapper: no copy at all.)
SPOOL_BYTES = 64 * 1024
# ...except request bodies of a known length while all those held in memory together stay
# under this: a temporary file per upload cost ~10 % of the server's CPU under 1,000 devices,
# and this bound keeps memory O(1) in the number of devices all the same.
BODY_MEMORY_BUDGET = 32 * 1024 * 1024
# Bytes asked of a socket per read: waitress's 8 KB meant ~50 turns of its I/O loop (a poll
# over every connection) per 400 KB upload.
RECV_BYTES = 256 * 1024
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
            _allow_open_files(options.connection_limit + 256)
            self._server, listening = _waitress(app, options)
            port = listening[0].effective_port
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


# --- waitress, hardened --------------------------------------------------------------------------
# waitress answers some requests itself, before the app sees them, in plain text; and it closes
# a connection only after --channel-timeout seconds *without a byte*, so a client trickling one
# header line every few seconds keeps its connection for ever. At the connection limit such
# connections locked every client out. The classes below change exactly that: waitress's own
# errors are the app's JSON errors (a URI its parser chokes on too), a connection must finish its
# headers within --header-timeout, and at the connection limit the least recently active
# connections that are not being served (idle, or still sending headers) are closed to make room.

# At the connection limit, 1/SHED_SHARE of it is closed at once (the least recently active first).
SHED_SHARE = 20


def _waitress_error(error: Any) -> tuple[str, str, str | None]:
    """``(code, message, field)`` for one of waitress's own error objects (waitress.utilities)."""
    detail = str(error.body)
    if error.code == 413:
        return "too_large", f"the request body is too large ({detail})", "body"
    if error.code == 431:
        return "headers_too_large", f"the request headers are too large ({detail})", "headers"
    if error.code == 400:
        return "bad_request", f"malformed HTTP request: {detail}", "uri" if "URI" in detail else "request"
    if error.code == 501:
        return "not_implemented", detail, "Transfer-Encoding"
    return "internal_error", "internal server error", None  # waitress's text may hold a traceback


class _JSONErrorTask(ErrorTask):
    """waitress's refusals (413, 431, 400, 501, and 500 for a crash) in the app's JSON shape."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps(error_body(*_waitress_error(error))).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _BodyBudget:
    """Bytes of request bodies held in memory at once, across all connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.limit:
                return False
            self.used += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.used -= size


_BODIES = _BodyBudget(BODY_MEMORY_BUDGET)


class _MemoryBody(OverflowableBuffer):
    """A request body of known size kept in memory; its share of the budget is given back when
    waitress closes it, or when it is dropped however the request ended."""

    def __init__(self, size: int) -> None:
        super().__init__(size + 1)  # never reaches its overflow: the receiver stops at ``size``
        self._release = weakref.finalize(self, _BODIES.give_back, size)

    def close(self) -> None:
        super().close()
        self._release()


class _Parser(HTTPRequestParser):
    """waitress's request parser, with the one parse error it lets escape made a 400 (a URI that
    ``urllib.parse`` refuses, ``http://[x/``, raised ValueError and the connection was dropped),
    and request bodies kept in memory within :data:`BODY_MEMORY_BUDGET`."""

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except ValueError as exc:
            raise ParsingError(f"Bad URI: {exc}") from None
        body = self.body_rcv
        size = self.content_length
        if (isinstance(body, FixedStreamReceiver) and SPOOL_BYTES < size <= self.adj.max_request_body_size
                and _BODIES.take(size)):
            body.buf = _MemoryBody(size)


class _Channel(HTTPChannel):
    """A connection whose request headers must be complete by ``header_deadline``."""

    error_task_class = _JSONErrorTask
    parser_class = _Parser
    header_deadline: float | None = None  # None: not in the middle of a request's headers

    def __init__(self, server: _Server, sock: Any, addr: Any, adj: Adjustments, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        # A new connection owes its first request's headers: connecting and staying silent counts.
        self.header_deadline = self.creation_time + server.header_timeout

    def received(self, data: bytes) -> bool:
        if self.header_deadline is None and self.request is None:  # a new request begins
            self.header_deadline = time.time() + self.server.header_timeout
        result = super().received(data)
        if self.request is None or self.request.headers_finished:
            self.header_deadline = None
        return result


class _Server(TcpWSGIServer):
    """waitress's TCP server with the header deadline and shedding at the connection limit."""

    channel_class = _Channel
    header_timeout = 10.0

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        for channel in list(self.active_channels.values()):
            deadline = channel.header_deadline
            if deadline is not None and now > deadline and not channel.requests:
                channel.will_close = True

    def readable(self) -> bool:
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            self._shed()
        return super().readable()

    def _shed(self) -> None:
        """Close the least recently active connections nobody is being served on, so that new
        clients get in; an upload in progress or a long poll is never one of them."""
        idle = [c for c in self.active_channels.values()
                if not (c.requests or c.total_outbufs_len or c.will_close or c.close_when_flushed)
                and (c.request is None or not c.request.headers_finished)]
        idle.sort(key=lambda c: c.last_activity)
        for channel in idle[: max(1, self.adj.connection_limit // SHED_SHARE)]:
            channel.will_close = True
        if idle:
            self.pull_trigger()  # wake the loop now, so they close in this round of polling


def _waitress(app: Flask, options: ServeOptions) -> tuple[Any, list[_Server]]:
    """What ``waitress.create_server`` builds, with :class:`_Server` as the server class."""
    adj = Adjustments(
        host=options.host, port=options.port, threads=options.threads,
        max_request_body_size=options.max_body_bytes, channel_timeout=options.channel_timeout,
        cleanup_interval=max(1, int(min(options.channel_timeout, options.header_timeout) / 2)),
        ident="fedhub", connection_limit=options.connection_limit,
        asyncore_use_poll=True,  # poll(), as select() cannot watch file descriptors above 1023
        inbuf_overflow=SPOOL_BYTES, outbuf_overflow=SPOOL_BYTES, recv_bytes=RECV_BYTES)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    socket_map: dict[int, Any] = {}
    servers = [_Server(app, socket_map, dispatcher=dispatcher, adj=adj, sockinfo=info)
               for info in adj.listen]
    for server in servers:
        server.header_timeout = options.header_timeout
    if len(servers) == 1:
        return servers[0], servers
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, servers[0].log_info), servers


def _allow_open_files(needed: int) -> None:
    """Raise this process's open-file limit toward ``needed``: each connection is a file, and a
    soft limit of 1,024 would refuse connections long before the connection limit does."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# cheroot's own refusals: (code, field) by status; the message is cheroot's text for 4xx.
_CHEROOT_ERRORS = {400: ("bad_request", "request"), 405: ("method_not_allowed", "method"),
                   408: ("timeout", "request"), 413: ("too_large", "body"), 414: ("uri_too_long", "uri"),
                   501: ("not_implemented", "Transfer-Encoding"),
                   505: ("http_version_not_supported", "request")}


def _cheroot_error(status: str, msg: str | bytes) -> bytes:
    """The JSON body for one of cheroot's ``simple_response`` calls."""
    number = int(status[:3]) if status[:3].isdigit() else 500
    reason = status[4:] or "error"
    text = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg or "")
    if number >= 500 and number not in _CHEROOT_ERRORS:  # its text may hold a traceback
        return json.dumps(error_body("unavailable" if number == 503 else "internal_error",
                                     reason.lower(), None)).encode()
    code, field = _CHEROOT_ERRORS.get(number, ("bad_request", "request"))
    return json.dumps(error_body(code, text or reason.lower(), field)).encode()


def _cheroot_classes() -> tuple[type, type]:
    """cheroot's request and connection classes with JSON refusals (imported only for TLS)."""
    from cheroot.server import CRLF, HTTPConnection, HTTPRequest

    class JSONRequest(HTTPRequest):
        def simple_response(self, status: Any, msg: Any = "") -> None:
            status = str(status)
            body = _cheroot_error(status, msg)
            if status[:3] in {"413", "414"}:
                self.close_connection = True
            head = (f"{self.server.protocol} {status}\r\nContent-Length: {len(body)}\r\n"
                    "Content-Type: application/json\r\n")
            if self.close_connection:
                head += "Connection: close\r\n"
            with contextlib.suppress(OSError):  # the client may be gone; cheroot ignores that too
                self.conn.wfile.write(head.encode("latin-1") + CRLF + body)

    class JSONConnection(HTTPConnection):
        RequestHandlerClass = JSONRequest

    return JSONRequest, JSONConnection


def check_tls_files(options: ServeOptions) -> None:
    """ValueError when TLS is asked for without both of its files: said before the slow start-up."""
    if options.certfile is None:
        return
    if options.keyfile is None:
        raise ValueError("--certfile needs --keyfile")
    for path in (options.certfile, options.keyfile):
        if not Path(path).is_file():
            raise ValueError(f"TLS file not found: {path}")


def _cheroot(app: Flask, options: ServeOptions) -> Any:
    from cheroot.ssl.builtin import BuiltinSSLAdapter
    from cheroot.wsgi import Server

    check_tls_files(options)
    server = Server((options.host, options.port), app, numthreads=options.threads,
                    timeout=int(options.channel_timeout), server_name="fedhub")
    adapter = BuiltinSSLAdapter(str(options.certfile), str(options.keyfile))
    adapter.context.minimum_version = ssl.TLSVersion.TLSv1_2
    server.ssl_adapter = adapter
    server.ConnectionClass = _cheroot_classes()[1]
    server.max_request_body_size = options.max_body_bytes
    server.prepare()  # binds now, so the port is known and errors surface before serving
    return server
