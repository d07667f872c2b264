"""Issue 18, defects 3, 4 and 7, on the real server: text that UTF-8 cannot carry, request bodies
that trickle in, and one client's wrong credentials locking out every client at its address.

Each test fails on the code before the fix: a lone surrogate was a 500 (after the interrupted
route had already cleared the interrupt); trickling bodies were never closed and, at the
connection limit, only newcomers were shed; and after too many wrong credentials from an address,
the right ones from it were answered 429 too.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests
import trustme

from fedhub.server_process import free_port

from .conftest import ROOT, ServerProcess, wait_until

pytestmark = pytest.mark.slow

LIGHT = ("--test-limit", "50", "--no-tensorboard")


def assert_error(r: requests.Response, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "field", "message"}, body
    if field is not None:
        assert body["field"] == field, body
    return body


def enroll(server: ServerProcess, name: str) -> str:
    r = requests.post(f"{server.url}/api/devices/register", json={"name": name},
                      headers={"X-Enroll-Secret": server.enroll_secret}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def device_names(server: ServerProcess) -> list[str]:
    return sorted(d["name"] for d in server.get("/api/devices").json()["devices"])


# --- 3. lone UTF-16 surrogates -----------------------------------------------------------------


def test_lone_surrogates_are_refused_with_400_naming_the_field_and_change_nothing(server_factory):
    server = server_factory("--auto-activate", "--start", "--min-devices", "1", *LIGHT).start()
    token = enroll(server, "d1")

    def training():
        task = server.get("/api/devices/d1/task?wait=1", headers=auth(token)).json()
        return task if task["action"] == "train" else None

    round_number = wait_until(training, 60, "a training task for d1")["round"]
    assert server.admin("POST", "/api/devices/d1/interrupt").status_code == 200

    def post(path: str, body: object, token: str = token) -> requests.Response:
        # json.dumps writes a lone surrogate as the escape "\ud800": valid JSON, not valid text
        return requests.post(f"{server.url}{path}", data=json.dumps(body), timeout=30,
                             headers={**auth(token), "Content-Type": "application/json"})

    # the interrupted report: refused before the route acts, so the interrupt is still pending
    r = post("/api/devices/d1/interrupted", {"round": round_number, "detail": "stopped \ud800"})
    assert "surrogate" in assert_error(r, 400, "body.detail")["message"]
    assert server.get("/api/devices/d1/signal", headers=auth(token)).json()["interrupt"] is True
    # a log line, a validation problem, an object key: each named where it is
    line = {"level": "INFO", "message": "ok", "time": time.time()}
    r = post("/api/devices/d1/logs", [line, {**line, "message": "half a pair \udfff"}])
    assert_error(r, 400, "body[1].message")
    r = post("/api/devices/d1/validation", {"validation": {"ok": False, "problems": ["\ud800"]}})
    assert_error(r, 400, "body.validation.problems[0]")
    r = post("/api/devices/d1/progress", {"round": round_number, "\udbff": 1})
    assert_error(r, 400, "body")
    r = requests.post(f"{server.url}/api/devices/register", data=json.dumps({"name": "d2", "x": "\ud800"}),
                      headers={"X-Enroll-Secret": server.enroll_secret, "Content-Type": "application/json"},
                      timeout=30)
    assert_error(r, 400, "body.x")
    assert device_names(server) == ["d1"]
    # nothing was stored; a whole surrogate pair (an emoji) is ordinary text and goes through
    assert post("/api/devices/d1/logs", [{**line, "message": "pair \U0001f600"}]).status_code == 200
    messages = [e["message"] for e in server.admin("GET", "/api/logs?device=d1").json()["logs"]]
    assert messages == ["pair \U0001f600"], messages
    # the report with its surrogate removed is taken, and clears the interrupt
    r = post("/api/devices/d1/interrupted", {"round": round_number, "detail": "stopped"})
    assert r.status_code == 200, r.text
    assert server.get("/api/devices/d1/signal", headers=auth(token)).json()["interrupt"] is False
    # text from the URL and headers is decoded from bytes (never to a surrogate): no 500 either
    for path in ("/api/logs?device=%ED%A0%80&level=%FF", "/api/devices?name=%ED%A0%80%FF"):
        assert server.admin("GET", path).status_code < 500, path
    assert server.get("/api/devices/%ED%A0%80/signal", headers=auth(token)).status_code < 500
    assert "Traceback" not in server.log()


# --- 7. wrong credentials limit failures, not the right credentials ------------------------------


def test_right_credentials_are_served_from_an_address_that_sent_too_many_wrong_ones(server_factory):
    server = server_factory("--auth-failures-per-minute", "6", *LIGHT).start()
    token = enroll(server, "d1")
    for _ in range(6):
        assert_error(server.get("/api/logs", headers=auth("guess-" + "x" * 20)), 403)
    r = server.get("/api/logs", headers=auth("guess-" + "x" * 20))
    assert "too many wrong credentials" in assert_error(r, 429, "Authorization")["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 10, r.headers
    # the same address, every valid credential: the admin token, a device token, the secret
    assert server.admin("GET", "/api/logs").status_code == 200
    assert server.get("/api/devices/d1/signal", headers=auth(token)).status_code == 200
    assert enroll(server, "d2")
    # ...and every wrong one is still refused, 429 with Retry-After, naming what was wrong
    assert_error(server.get("/api/devices/d1/signal", headers=auth("forged")), 429, "Authorization")
    r = requests.post(f"{server.url}/api/devices/register", json={"name": "d3"}, timeout=30,
                      headers={"X-Enroll-Secret": "wrong-secret"})
    assert_error(r, 429, "enroll_secret")
    assert int(r.headers["Retry-After"]) >= 1
    assert device_names(server) == ["d1", "d2"]
    # a missing credential is not a guess: still 401, and the admin is still served
    assert_error(server.get("/api/logs"), 401)
    assert server.admin("GET", "/api/logs").status_code == 200


def test_a_short_person_chosen_secret_is_refused_at_start_up(tmp_path, data_dir):
    """Valid credentials are served however many wrong ones came first, so a secret must be
    unguessable in itself: a short one is one `error:` line and exit 2, before anything loads."""
    for short in ("FEDHUB_ADMIN_TOKEN", "FEDHUB_ENROLL_SECRET"):
        env = {**os.environ, "FEDHUB_ADMIN_TOKEN": "admin-test-token",
               "FEDHUB_ENROLL_SECRET": "enroll-test-secret", short: "fedhub"}
        out = subprocess.run(
            [sys.executable, str(ROOT / "server.py"), str(free_port()),
             "--state-dir", str(tmp_path / "state"), "--data-dir", str(data_dir), "--no-tensorboard"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the ") and short in last and "at least 16" in last, last


# --- 4. request bodies that trickle in ---------------------------------------------------------

BODY_HEAD = (b"POST /api/devices/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 4000\r\n\r\n{")


def _raise_open_files(wanted: int = 4096) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _open_trickler(port: int) -> socket.socket | None:
    """A connection that sent complete headers and the first byte of a 4,000-byte body."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(BODY_HEAD)
        s.setblocking(False)
        return s
    except OSError:
        return None


def _drain(s: socket.socket) -> tuple[bytes, bool]:
    """What the server sent since the last call, and whether the connection is still open."""
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got, False
            got += chunk
    except BlockingIOError:
        return got, True
    except OSError:
        return got, False


def test_slow_bodies_are_shed_before_newcomers_at_the_connection_limit(server_factory):
    """1,010 connections trickling a body byte each keep the server at its connection limit
    (1,000); the timeouts are long, so only shedding can make room. A normal request still gets
    its answer, again and again, and the server closes trickling connections to give it one."""
    _raise_open_files()
    server = server_factory("--header-timeout", "60", "--channel-timeout", "60", *LIGHT).start()
    held = [_open_trickler(server.port) for _ in range(1010)]
    assert all(held)
    stop = threading.Event()
    rounds = [0]
    closed_by_server = [0]

    def attack():  # one body byte per connection each second; closed ones are replaced
        while not stop.is_set():
            for i, s in enumerate(held):
                if s is not None and _drain(s)[1]:
                    try:
                        s.send(b" ")
                        continue
                    except OSError:
                        pass
                if s is not None:
                    closed_by_server[0] += 1
                    s.close()
                held[i] = _open_trickler(server.port)
            rounds[0] += 1
            stop.wait(1.0)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        wait_until(lambda: rounds[0] >= 2, 60, "the attack to be under way", interval=0.1)
        for _ in range(5):
            r = requests.get(f"{server.url}/health", timeout=(5, 5))
            assert r.json() == {"ok": True}
        assert closed_by_server[0] > 0
    finally:
        stop.set()
        attacker.join(30)
        for s in held:
            if s is not None:
                s.close()
    assert "Traceback" not in server.log()


def test_a_body_must_keep_up_a_minimum_rate_or_is_answered_408_and_closed(server_factory):
    """A body trickled at 2 bytes a second is closed a few seconds after it falls behind (not
    after --channel-timeout of silence: it is never silent); one sent at 4 KiB a second is
    served although it takes longer than --channel-timeout in all."""
    server = server_factory("--header-timeout", "60", "--channel-timeout", "3", *LIGHT).start()
    slow = [_open_trickler(server.port) for _ in range(5)]
    assert all(slow)
    answers = {id(s): b"" for s in slow}
    steady = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"name": "d1", "padding": "x" * 24_000}).encode()
    steady.sendall(b"POST /api/devices/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body))
    started = time.monotonic()
    sent = 0
    open_ = list(slow)

    def trickle() -> bool:
        nonlocal sent
        if sent < len(body):  # 2 KiB each half second
            steady.sendall(body[sent:sent + 2048])
            sent += 2048
        for s in list(open_):
            got, still_open = _drain(s)
            answers[id(s)] += got
            if not still_open:
                open_.remove(s)
                continue
            try:
                s.send(b" ")
            except OSError:
                open_.remove(s)
        return not open_ and sent >= len(body)

    try:
        wait_until(trickle, 40, "the trickling bodies to be closed", interval=0.5)
        assert time.monotonic() - started > 3  # the steady upload took longer than the timeout
        for s in slow:
            head, _, payload = answers[id(s)].partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), answers[id(s)][:200]
            error = json.loads(payload)
            assert error["error"] == "request_timeout" and error["field"] == "body", error
        steady.settimeout(30)
        reply = steady.recv(65536)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]  # served: no secret given
    finally:
        for s in (*slow, steady):
            s.close()
    assert server.get("/health").json() == {"ok": True}
    assert "Traceback" not in server.log()


def test_https_requests_must_keep_pace_too(server_factory, tmp_path):
    """cheroot (HTTPS) reads a request on a worker thread with a timeout per read, so a byte now
    and then held a worker for ever: headers trickled past --header-timeout and a body trickled
    below the minimum rate are now answered 408 and closed, and the server still answers."""
    ca = trustme.CA(organization_name="FedHub test CA")
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = server_factory("--certfile", str(tmp_path / "server.pem"),
                            "--keyfile", str(tmp_path / "server.key"),
                            "--header-timeout", "2", "--channel-timeout", "3", *LIGHT,
                            verify=str(tmp_path / "ca.pem")).start()
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    def tls(first: bytes) -> ssl.SSLSocket:
        s = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                server_hostname="127.0.0.1")
        s.sendall(first)
        s.settimeout(0.05)
        return s

    tricklers = {b"header": tls(b"GET /health HTTP/1.1\r\nHost: x\r\n"), b"body": tls(BODY_HEAD)}
    answers = {kind: b"" for kind in tricklers}
    open_ = dict(tricklers)

    def trickle() -> bool:
        for kind, s in list(open_.items()):
            try:
                while chunk := s.recv(4096):
                    answers[kind] += chunk
                del open_[kind]  # the server closed it
                continue
            except TimeoutError:
                pass
            except (OSError, ssl.SSLError):
                del open_[kind]
                continue
            try:
                s.sendall(b"X-Slow: 1\r\n" if kind == b"header" else b" ")
            except (OSError, ssl.SSLError):
                del open_[kind]
        return not open_

    try:
        wait_until(trickle, 40, "the trickling HTTPS requests to be closed", interval=0.5)
    finally:
        for s in tricklers.values():
            s.close()
    for kind, answer in answers.items():
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), (kind, answer[:300])
        assert json.loads(payload)["field"] == ("body" if kind == b"body" else "request"), payload
    assert server.get("/health").json() == {"ok": True}
    assert "Traceback" not in server.log()
