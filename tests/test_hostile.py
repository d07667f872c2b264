"""Hostile clients against the real server process: slow bodies, traversal, secrets in logs."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_slow_loris_connections_time_out_without_hanging_workers(server_factory):
    server = server_factory("--channel-timeout", "2", "--threads", "4", "--test-limit", "100").start()
    slow = []
    for _ in range(12):  # three times the worker threads
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /api/devices/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"na")
        slow.append(s)
    # Workers are free: waitress buffers a request fully before a worker thread sees it.
    for _ in range(5):
        assert server.get("/health").json() == {"ok": True}
    # Each stalled connection is closed by the server (--channel-timeout), with no answer: a
    # recv that waited the full 30 s would raise TimeoutError and fail the test.
    for s in slow:
        s.settimeout(30)
        try:
            data = s.recv(1024)
        except ConnectionResetError:
            data = b""
        assert data == b"", data[:100]
        s.close()
    assert server.get("/api/devices").json()["devices"] == [], "no half-sent request was processed"


def test_device_names_cannot_escape_their_folder(tmp_path):
    for name in ("../evil", "a/b", "..", "x" * 80):
        out = subprocess.run([sys.executable, "device/device.py", "4000", name, "--devices-root",
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, name
        assert "device name" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_secrets_never_in_logs_or_errors(server_factory, split_devices):
    from fedhub.device.launcher import stop

    from .conftest import launch_devices, wait_until

    root = split_devices(1, 200)
    server = server_factory("--rounds", "1", "--auto-activate", "--start", "--test-limit", "200").start()
    procs = launch_devices(server, root, ["device1"])
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 120, "the run")
    finally:
        stop(procs)
    token = (root / "device1" / "token").read_text().strip()
    assert stat.S_IMODE(os.stat(root / "device1" / "token").st_mode) == 0o600
    # refusals echo nothing secret back
    # (a device route: a wrong device token and the admin token are both unknown device tokens)
    for header in (f"Bearer {token}x", f"Bearer {server.admin_token}"):
        r = server.get("/api/devices/device2/task", headers={"Authorization": header})
        assert r.status_code == 401, (r.status_code, r.text)
        assert token not in r.text and server.admin_token not in r.text
    server.stop()
    logs = server.log_path.read_text() + (root.parent / "logs" / "device1.log").read_text()
    for secret in (token, server.admin_token, server.enroll_secret):
        assert secret not in logs


def test_secret_files_must_be_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin.token").write_text("shared-with-everyone\n")
    os.chmod(state / "admin.token", 0o644)
    # Said before the data loads: here there is none to load, and the message is still this one.
    env = {k: v for k, v in os.environ.items()
           if k not in ("FEDHUB_ADMIN_TOKEN", "FEDHUB_ENROLL_SECRET", "FEDHUB_DATA_DIR")}
    env["KERAS_HOME"] = str(tmp_path / "keras")
    out = subprocess.run([sys.executable, "server.py", "0", "--state-dir", str(state), "--test-limit", "10"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert "readable by others" in out.stderr and "chmod 600" in out.stderr
    assert "shared-with-everyone" not in out.stderr + out.stdout
    # The enrollment secret is read (here: created) before the admin token is checked; what the
    # server wrote before refusing is owner-only.
    created = state / "enroll.secret"
    assert created.exists()
    assert stat.S_IMODE(created.stat().st_mode) == 0o600
