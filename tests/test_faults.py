"""Faults survived, each on real processes: killed devices, vanished fleets, lost answers, full disks."""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest

from fedhub.device.client import Client
from fedhub.device.launcher import stop
from fedhub.engine import wire

from .conftest import launch_devices, wait_until

pytestmark = pytest.mark.slow


def _status(server):
    return server.get("/api/status").json()


def _history(server):
    return server.get("/api/history").json()["rounds"]


def _devices(server):
    return {d["name"]: d for d in server.get("/api/devices").json()["devices"]}


def _round(server):
    return _status(server)["round"] or {}


def test_device_killed_mid_round_quorum_then_rejoins(server_factory, split_devices):
    """A device killed in the middle of a round: the round closes at its deadline with the
    quorum's updates; the next round waits for three devices (--min-devices 3), and the device
    rejoins with its saved token and is selected again.

    Each step waits on the server's state, and no deadline times a first fit: round 1 is a
    warm-up, round 2's deadline times only warm fits of 300 images. device3 trains with
    ``tests.slow_trainer`` (from round 2 on at least a second a batch, ten batches), so it cannot
    report round 2 before it is killed, however long the test takes to see the round open; its
    warm-up round runs at full speed, as the others'."""
    root = split_devices(3, 300)
    server = server_factory("--rounds", "3", "--min-devices", "3", "--auto-activate", "--round-timeout", "15",
                            "--quorum", "0.5", "--device-timeout", "8", "--test-limit", "500").start()
    names = ["device1", "device2", "device3"]
    procs = launch_devices(server, root, names[:2])
    procs += launch_devices(server, root, names[2:], "--trainer", "tests.slow_trainer:slow_from_round_2")
    try:
        wait_until(lambda: {n: d["state"] for n, d in _devices(server).items()}
                   == dict.fromkeys(names, "idle"), 120, "three idle devices")
        assert server.admin("POST", "/api/training/start").ok
        wait_until(lambda: _round(server).get("number") == 2 and _round(server).get("selected") == names,
                   120, "round 2 open with all three", interval=0.1)
        procs[2].send_signal(signal.SIGKILL)  # device3 is still training round 2, slowly
        procs[2].wait()
        wait_until(lambda: len(_history(server)) == 2, 60, "round 2 to close at its deadline")
        second = _history(server)[1]
        assert second["num_updates"] == 2 and set(second["devices"]) == {"device1", "device2"}
        wait_until(lambda: _devices(server)["device3"]["state"] == "offline", 30, "device3 offline")
        # (device3 went offline 8 s after it was killed, before round 2's 15 s deadline: round 3
        # waits for it rather than selecting a dead device)
        wait_until(lambda: _status(server)["reason"] == "waiting for devices: 2 active and online, 3 needed",
                   10, "round 3 to wait for a third device")
        assert _status(server)["round"] is None and len(_history(server)) == 2

        procs[2:] = launch_devices(server, root, ["device3"])  # rejoins with its saved token
        wait_until(lambda: _status(server)["status"] == "finished", 120, "round 3")
    finally:
        stop(procs)
    third = _history(server)[2]
    assert third["num_updates"] == 3 and "device3" in third["devices"], "selected again after rejoining"


def test_all_devices_gone_server_waits_then_resumes(server_factory, split_devices):
    root = split_devices(1, 300)
    server = server_factory("--rounds", "2", "--auto-activate", "--device-timeout", "3",
                            "--test-limit", "500").start()
    procs = launch_devices(server, root, ["device1"])
    try:
        wait_until(lambda: _devices(server).get("device1", {}).get("state") == "idle", 120, "device1")
        assert server.admin("POST", "/api/training/start").ok
        wait_until(lambda: _round(server).get("number") == 1, 30, "round 1 to open")
        assert server.admin("POST", "/api/training/pause").ok
        wait_until(lambda: len(_history(server)) == 1, 60, "round 1")
        procs[0].send_signal(signal.SIGKILL)  # every device gone, without a goodbye
        procs[0].wait()
        wait_until(lambda: _devices(server)["device1"]["state"] == "offline", 30, "device1 offline")
        assert server.admin("POST", "/api/training/resume").ok
        status = wait_until(lambda: (s := _status(server))["reason"].startswith("waiting for devices") and s,
                            30, "'waiting for devices'")
        assert status["status"] == "running" and status["round"] is None
        assert server.get("/health").ok and len(_history(server)) == 1

        procs = launch_devices(server, root, ["device1"])
        wait_until(lambda: _status(server)["status"] == "finished", 120, "round 2 after the device returned")
    finally:
        stop(procs)
    assert [r["num_updates"] for r in _history(server)] == [1, 1]


class LostFirstAnswerProxy:
    """A loopback TCP proxy that loses the server's answer to the first upload.

    The client gives up waiting for it and sends the upload again. So that the retry cannot
    overtake the first upload, every later upload is held back until ``first_counted()`` says
    the server has counted the first one: the test waits on that state, not on a delay.
    """

    def __init__(self, upstream_port: int, first_counted) -> None:
        self.upstream = upstream_port
        self.first_counted = first_counted
        self.uploads = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream))
        lost = threading.Event()  # this connection carried the first upload: its answer is lost

        def pump(src, dst, requests_side):
            try:
                while data := src.recv(65536):
                    if requests_side and data.startswith(b"POST") and b"/updates/" in data:
                        self.uploads += 1
                        if self.uploads == 1:
                            lost.set()
                        else:
                            wait_until(self.first_counted, 60, "the first upload to be counted", 0.05)
                    if requests_side or not lost.is_set():
                        dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
        pump(client, upstream, True)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


def _random_like(weights, seed):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(scale=0.05, size=a.shape).astype(a.dtype) for n, a in weights.items()}


def _enroll(url, server, name="sim1", **kw):
    client = Client(url, name, retry_for=60, **kw)
    client.register(server.enroll_secret, auto_activate=True)
    return client


def _train_task(client):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = client.task(wait=2)
        if task["action"] == "train":
            return task
    raise AssertionError(f"no task: {task}")


def test_upload_retried_after_client_timeout_is_counted_once(server_factory):
    server = server_factory("--rounds", "1", "--start", "--test-limit", "200").start()
    def counted() -> bool:  # the round closes as soon as it is counted: look in the database
        with contextlib.closing(sqlite3.connect(server.state_dir / "fedhub.sqlite3")) as db:
            return db.execute("SELECT COUNT(*) FROM updates").fetchone()[0] > 0

    proxy = LostFirstAnswerProxy(server.port, counted)
    try:
        # a short timeout only makes the client give up on the lost answer sooner; a slow
        # server merely costs it more retries, which are acknowledged the same way
        client = _enroll(f"http://127.0.0.1:{proxy.port}", server, timeout=2)
        task = _train_task(client)
        version, weights = client.model()
        update = _random_like(weights, 1)
        ack = client.upload(task["round"], update, num_examples=123, model_version=version,
                            upload_id=uuid.uuid4().hex)
    finally:
        proxy.close()
    assert proxy.uploads >= 2, "the client timed out and sent the upload again"
    assert ack["duplicate"] is True, "the retry was recognised by its Idempotency-Key"
    wait_until(lambda: _status(server)["status"] == "finished", 30, "round 1")
    assert _history(server)[0]["num_updates"] == 1 and _history(server)[0]["num_examples"] == 123
    db = sqlite3.connect(server.state_dir / "fedhub.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (1,)
    got, _ = wire.decode(server.admin("GET", "/api/model").content)
    for name, a in update.items():
        np.testing.assert_array_equal(got[name], a)  # one update: the mean is that update, once


def test_failed_checkpoint_write_keeps_previous_model(server_factory, tmp_path):
    server = server_factory("--rounds", "2", "--start", "--test-limit", "200").start()
    client = _enroll(server.url, server)
    task = _train_task(client)
    version, weights = client.model()
    client.upload(task["round"], _random_like(weights, 1), num_examples=10, model_version=version)
    wait_until(lambda: _status(server)["model_version"] == 1, 30, "round 1")
    before = server.admin("GET", "/api/model").content
    saved = server.state_dir / "saved"
    listing = sorted(p.name for p in saved.iterdir())
    # A full disk: a 4 KiB filesystem over the checkpoint folder.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(saved)], check=True)
    try:
        task = _train_task(client)
        assert task["round"] == 2
        client.upload(2, _random_like(weights, 2), num_examples=10, model_version=1)
        status = wait_until(lambda: (s := _status(server))["last_error"] and s, 30, "the reported error")
        assert "could not be saved" in status["last_error"] and "No space left" in status["last_error"]
        assert status["model_version"] == 1
        assert server.admin("GET", "/api/model").content == before, "the previous model is still served"
        assert server.get("/health").ok
        assert list(saved.iterdir()) == [], "no half-written checkpoint left behind"
        task = _train_task(client)  # the round runs again
        assert task["round"] == 2
    finally:
        subprocess.run(["umount", str(saved)], check=True)
    assert sorted(p.name for p in saved.iterdir()) == listing, "earlier checkpoints untouched"
    update = _random_like(weights, 3)
    client.upload(2, update, num_examples=10, model_version=1)
    wait_until(lambda: _status(server)["status"] == "finished", 30, "round 2 once the disk has room")
    assert _status(server)["last_error"] is None
    got, meta = wire.decode(server.admin("GET", "/api/model").content)
    assert meta.model_version == 2
    for name, a in update.items():
        np.testing.assert_array_equal(got[name], a)


def test_the_device_client_retries_an_answer_cut_off_midway():
    """A server killed while answering leaves a body shorter than its Content-Length: the
    device's client sends the request again (same headers, so the same Idempotency-Key)
    instead of crashing with ChunkedEncodingError."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        for attempt in range(2):
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                seen.append(request)
                body = b'{"accepted": true}'
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                if attempt == 0:
                    conn.sendall(head % (len(body) + 100) + body[:5])  # then the "server" dies
                else:
                    conn.sendall(head % len(body) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Client(f"http://127.0.0.1:{port}", "d1", token="t", timeout=5, retry_for=20)
    response = client.request("POST", "/api/devices/d1/updates/1", data=b"x",
                              headers={"Idempotency-Key": "k1"})
    assert response.json() == {"accepted": True}
    assert len(seen) == 2 and all(b"Idempotency-Key: k1" in r for r in seen)
    listener.close()
