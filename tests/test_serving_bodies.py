"""Request bodies in the real waitress server (fedhub/api/serving.py): held in memory within one budget
for all connections, spooled to a temporary file beyond it, and the budget always given back,
however the request ends."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from flask import Flask, jsonify, request

from fedhub.api import serving
from fedhub.api.inputs import binary_body

from .conftest import wait_until


@pytest.fixture
def echo_server():
    """A real waitress server whose one route answers a body's digest and how it was held."""
    app = Flask(__name__)
    inside = threading.Barrier(2, timeout=30)
    app.config["hold"] = False

    @app.post("/echo")
    def echo():
        held = "memory" if isinstance(request.environ["wsgi.input"], io.BytesIO) else "file"
        body = binary_body()
        if app.config["hold"]:
            inside.wait()  # two requests inside at once: both bodies held together
        return jsonify(sha256=hashlib.sha256(body).hexdigest(), held=held, used=serving._BODIES.used)

    server = serving.Serving(app, serving.ServeOptions(port=0, threads=4))
    server.start()
    try:
        yield server, app
    finally:
        server.stop()


def post(url: str, body: bytes) -> dict:
    r = requests.post(f"{url}/echo", data=body, timeout=30,
                      headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    return r.json()


def settled(expected: int = 0, limit: float = 10.0) -> int:
    deadline = time.monotonic() + limit
    while serving._BODIES.used != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return serving._BODIES.used


def test_bodies_are_held_in_memory_and_the_budget_is_given_back(echo_server):
    server, _ = echo_server
    bodies = [bytes([i]) * (serving.SPOOL_BYTES + 1000 * i) for i in range(1, 9)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: post(server.url, b), bodies))
    for body, answer in zip(bodies, answers, strict=True):
        assert answer["sha256"] == hashlib.sha256(body).hexdigest()
        assert answer["held"] == "memory"
        assert answer["used"] >= len(body)  # its own share was taken while it was served
    assert settled() == 0


def test_beyond_the_budget_bodies_go_to_a_file_and_arrive_whole(echo_server, monkeypatch):
    server, app = echo_server
    size = 300_000
    monkeypatch.setattr(serving._BODIES, "limit", size + 10)  # room for one body, not two
    app.config["hold"] = True
    bodies = [b"a" * size, b"b" * size]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda b: post(server.url, b), bodies))
    assert sorted(a["held"] for a in answers) == ["file", "memory"]
    assert [a["sha256"] for a in answers] == [hashlib.sha256(b).hexdigest() for b in bodies]
    assert settled() == 0


def test_a_client_that_leaves_mid_body_gives_its_share_back(echo_server):
    server, _ = echo_server
    for _ in range(5):
        assert settled() == 0  # the previous connection's share is back before this one starts
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                      b"Content-Length: 500000\r\n\r\n" + b"x" * 100_000)
            # reserved for the body on its way, once waitress has read its headers
            wait_until(lambda: serving._BODIES.used >= 500_000, 10, "the body's share to be reserved",
                       interval=0.02)
    assert settled() == 0
    assert post(server.url, b"y" * 200_000)["held"] == "memory"


def test_a_body_over_the_size_limit_takes_no_share(echo_server):
    server, _ = echo_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: %d\r\n\r\n" % (serving.ServeOptions.max_body_bytes + 1))
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after its answer
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b'"field": "body"' in reply.replace(b'":"', b'": "')
    assert settled() == 0

