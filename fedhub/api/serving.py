"""Serve the Flask app with a production WSGI server.

Plain HTTP goes through waitress. waitress has no TLS, so when given a
certificate and key the app is served by cheroot (CherryPy's server) with
Python's ssl module instead; in production a reverse proxy usually terminates
TLS in front of waitress (see the README). waitress is used through three small
subclasses (below) so that its own errors are JSON and slow-loris clients cannot
hold its connections; cheroot's own errors are made JSON, and its reads paced, by a few more.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import socket
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

# Slowest average rate, in bytes a second, at which a request body may arrive (after the headers;
# --channel-timeout seconds of it in hand). A device on a 100 kbit/s link sends 12,500; one body
# byte every 5 s (0.2 B/s) held a connection for ever before.
MIN_BODY_RATE = 1024.0


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
    # Slowest average rate (bytes a second) at which a request body may arrive; below it the
    # connection is answered 408 and closed once --channel-timeout seconds behind.
    min_body_rate: float = MIN_BODY_RATE
    certfile: Path | None = None
    keyfile: Path | None = None
    # Open connections at which the least recently active ones not being served are closed.
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
# header line, or one body byte, every few seconds keeps its connection for ever. At the
# connection limit such connections locked every client out: waitress stops accepting, and
# nothing it buffers ever completes. The classes below change exactly that:
# - waitress's own errors are the app's JSON errors (a URI its parser chokes on too);
# - a connection must finish its request headers within --header-timeout, and then its body
#   must keep arriving at MIN_BODY_RATE bytes a second on average, with at most
#   --channel-timeout seconds in hand (it is answered 408 and closed otherwise): one deadline
#   per connection, which each body byte moves 1 / MIN_BODY_RATE s later, never more than
#   --channel-timeout ahead of the present;
# - at the connection limit the connections that are not being served (idle between requests,
#   or still sending headers or a body) are closed, least recently active first, to make room:
#   a trickling connection is always less recently active than a client that just connected and
#   sent its request in one go, so the tricklers go, never the newcomers.
# A connection being served (its request with a worker thread, or its answer being sent) is
# never closed by these rules, and its deadline waits: waitress does not read from it meanwhile.

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


def _too_slow_response(min_rate: float, allowance: float) -> bytes:
    """The 408 a connection whose body arrives too slowly gets before it is closed."""
    body = json.dumps(error_body(
        "request_timeout", f"the request body arrived too slowly: it must keep up an average of "
        f"{min_rate:g} bytes a second, and never fall more than {allowance:g} s behind", "body")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


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
    """A connection that must receive each request at a pace: its headers by ``deadline``
    (``--header-timeout`` after they began), then its body at :data:`MIN_BODY_RATE`."""

    error_task_class = _JSONErrorTask
    parser_class = _Parser
    server: _Server
    # When the request being received must have progressed by; None while nothing is owed
    # (between requests: waitress's --channel-timeout covers idleness there).
    deadline: float | None = None
    in_body = False  # the deadline is the body's (else the headers')

    def __init__(self, server: _Server, sock: Any, addr: Any, adj: Adjustments, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        # A new connection owes its first request's headers: connecting and staying silent counts.
        self.deadline = self.creation_time + server.header_timeout

    def received(self, data: bytes) -> bool:
        now = time.time()
        before = self.request
        body_before = before is not None and before.headers_finished
        if self.deadline is None and before is None:  # a new request begins
            self.deadline = now + self.server.header_timeout
        result = super().received(data)
        request = self.request
        if request is None:  # complete (or nothing): it is served now, or nothing is owed
            self.deadline, self.in_body = None, False
        elif not request.headers_finished:
            if before is not None and request is not before:  # the next, pipelined, request began
                self.deadline = now + self.server.header_timeout
            self.in_body = False
        elif request is before and body_before and self.deadline is not None:  # more of its body
            self.deadline = min(self.deadline + len(data) / self.server.min_body_rate,
                                now + self.adj.channel_timeout)
        else:  # its headers are complete: the body's clock starts, with the allowance in hand
            self.deadline, self.in_body = now + self.adj.channel_timeout, True
        return result

    @property
    def being_served(self) -> bool:
        """A worker has its request, or its answer is being sent: waitress reads nothing now."""
        return bool(self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed)

    def time_out(self) -> None:
        """Close a connection that fell behind: a 408 first if it was sending a body (a header
        that never ended gets no answer, as a connection that never spoke)."""
        if self.in_body:
            with contextlib.suppress(OSError):  # non-blocking: what does not fit is dropped
                self.socket.send(_too_slow_response(self.server.min_body_rate, self.adj.channel_timeout))
        self.deadline = None
        self.will_close = True


class _Server(TcpWSGIServer):
    """waitress's TCP server with the request pace (:class:`_Channel`) and shedding at the
    connection limit."""

    channel_class = _Channel
    header_timeout = 10.0
    min_body_rate = MIN_BODY_RATE

    def maintenance(self, now: float) -> None:
        super().maintenance(now)
        for channel in list(self.active_channels.values()):
            deadline = channel.deadline
            if deadline is None:
                continue
            if channel.being_served:  # not read meanwhile: its clock waits
                allowance = self.adj.channel_timeout if channel.in_body else self.header_timeout
                channel.deadline = max(deadline, now + allowance)
            elif now > deadline:
                channel.time_out()

    def readable(self) -> bool:
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            self._shed()
        return super().readable()

    def _shed(self) -> None:
        """Close the least recently active connections nobody is being served on (idle, or
        trickling headers or a body), so that new clients get in; a long poll or an answer
        being sent is never one of them."""
        waiting = [c for c in self.active_channels.values() if not c.being_served]
        waiting.sort(key=lambda c: c.last_activity)
        for channel in waiting[: max(1, self.adj.connection_limit // SHED_SHARE)]:
            channel.will_close = True
        if waiting:
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
        server.min_body_rate = options.min_body_rate
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


class _Pace:
    """The pace a cheroot connection must receive its current request at. cheroot reads a
    request on a worker thread, with one socket timeout per read, so a client sending a byte
    now and then kept a worker (and its connection) for ever; here every read's timeout is the
    time left: the headers within --header-timeout, then the body at ``min_rate`` bytes a
    second with at most --channel-timeout in hand (the rule of waitress's :class:`_Channel`)."""

    def __init__(self, header_timeout: float, allowance: float, min_rate: float) -> None:
        self.header_timeout, self.allowance, self.min_rate = header_timeout, allowance, min_rate
        self.deadline: float | None = None  # None: no request being received
        self.in_body = False
        self.timed_out = False

    def headers(self) -> None:
        self.deadline, self.in_body, self.timed_out = time.monotonic() + self.header_timeout, False, False

    def body(self) -> None:
        self.deadline, self.in_body = time.monotonic() + self.allowance, True

    def done(self) -> None:
        self.deadline, self.in_body = None, False

    def received(self, size: int) -> None:
        if self.in_body and self.deadline is not None:
            self.deadline = min(self.deadline + size / self.min_rate, time.monotonic() + self.allowance)

    def expired(self) -> Exception:
        """What a read past the deadline raises: cheroot answers a timeout in the headers with
        its own 408; in the body (read by the app) werkzeug's 408 is the app's JSON error."""
        from werkzeug.exceptions import RequestTimeout

        self.timed_out = True
        if self.in_body:
            return RequestTimeout(f"the request body arrived too slowly: it must keep up an average of "
                                  f"{self.min_rate:g} bytes a second, and never fall more than "
                                  f"{self.allowance:g} s behind")
        return TimeoutError("timed out")


class _PacedSocketIO(socket.SocketIO):
    """The socket under a cheroot connection's reader: each read waits at most the time its
    :class:`_Pace` has left (else cheroot's own timeout), and counts what arrived."""

    def __init__(self, sock: Any, pace: _Pace) -> None:
        super().__init__(sock, "rb")
        self._pace = pace

    def readinto(self, buffer: Any) -> int | None:
        pace = self._pace
        if pace.deadline is None:
            return super().readinto(buffer)
        left = pace.deadline - time.monotonic()
        if left <= 0:
            raise pace.expired()
        previous = self._sock.gettimeout()
        self._sock.settimeout(left)
        try:
            size = super().readinto(buffer)
        except TimeoutError:
            raise pace.expired() from None
        finally:
            self._sock.settimeout(previous)
        if size:
            pace.received(size)
        return size


def _cheroot_classes() -> tuple[type, type]:
    """cheroot's request and connection classes with JSON refusals and the request pace
    (imported only for TLS)."""
    import _pyio

    from cheroot.makefile import StreamReader
    from cheroot.server import CRLF, HTTPConnection, HTTPRequest

    class PacedReader(StreamReader):
        def __init__(self, sock: Any, pace: _Pace, size: int) -> None:  # StreamReader's, paced
            _pyio.BufferedReader.__init__(self, _PacedSocketIO(sock, pace), size)
            self.bytes_read = 0

    class JSONRequest(HTTPRequest):
        def parse_request(self) -> None:
            pace: _Pace = self.conn.pace
            pace.headers()
            super().parse_request()
            if self.ready:
                pace.body()
            else:
                pace.done()

        def send_headers(self) -> None:
            # A body the app left unread (or that timed out) is not drained: the connection closes.
            if self.conn.pace.timed_out or getattr(self.rfile, "remaining", 0) > 0:
                self.close_connection = True
            super().send_headers()

        def simple_response(self, status: Any, msg: Any = "") -> None:
            status = str(status)
            body = _cheroot_error(status, msg)
            if status[:3] in {"408", "413", "414"}:
                self.close_connection = True
            head = (f"{self.server.protocol} {status}\r\nContent-Length: {len(body)}\r\n"
                    "Content-Type: application/json\r\n")
            if self.close_connection:
                head += "Connection: close\r\n"
            with contextlib.suppress(OSError):  # the client may be gone; cheroot ignores that too
                self.conn.wfile.write(head.encode("latin-1") + CRLF + body)

    class JSONConnection(HTTPConnection):
        RequestHandlerClass = JSONRequest

        def __init__(self, server: Any, sock: Any, makefile: Any = None) -> None:
            super().__init__(server, sock, *([makefile] if makefile is not None else []))
            self.pace = _Pace(*server.fedhub_pace)
            self.rfile = PacedReader(sock, self.pace, self.rbufsize)

        def communicate(self) -> bool:
            try:
                return super().communicate()
            finally:
                self.pace.done()

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
    server.fedhub_pace = (options.header_timeout, options.channel_timeout, options.min_body_rate)
    server.max_request_body_size = options.max_body_bytes
    server.prepare()  # binds now, so the port is known and errors surface before serving
    return server
