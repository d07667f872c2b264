"""HTTPS: the server serves TLS when given a certificate; devices verify it (custom CA via --ca)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys

import pytest
import requests
import trustme

from fedhub.device.launcher import stop

from .conftest import ROOT, launch_devices

pytestmark = pytest.mark.slow


@pytest.fixture
def tls_files(tmp_path):
    ca = trustme.CA(organization_name="FedHub test CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def test_device_trains_over_https_with_custom_ca(server_factory, split_devices, tls_files):
    root = split_devices(1, 300)
    server = server_factory("--rounds", "1", "--auto-activate", "--start", "--test-limit", "500",
                            "--certfile", str(tls_files["cert"]), "--keyfile", str(tls_files["key"]),
                            verify=str(tls_files["ca"])).start()
    assert server.url.startswith("https://")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(server.url + "/health", timeout=5)  # the system CAs do not know our test CA
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.url.replace("https", "http") + "/health", timeout=5)  # no plain HTTP

    procs = launch_devices(server, root, ["device1"], "--ca", str(tls_files["ca"]))
    try:
        assert procs[0].wait(180) == 0
    finally:
        stop(procs)
    history = server.get("/api/history").json()["rounds"]
    assert len(history) == 1 and history[0]["num_updates"] == 1


def test_device_refuses_an_unknown_certificate(server_factory, split_devices, tls_files, tmp_path):
    root = split_devices(1, 300)
    server = server_factory("--certfile", str(tls_files["cert"]), "--keyfile", str(tls_files["key"]),
                            "--test-limit", "200", verify=str(tls_files["ca"])).start()
    out = subprocess.run(
        [sys.executable, "device/device.py", "--server", server.url, "--name", "device1",
         "--devices-root", str(root), "--enroll-secret", server.enroll_secret],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "CERTIFICATE_VERIFY_FAILED" in text and "--ca" in text
    assert "Traceback" not in text
    assert server.get("/api/devices").json()["devices"] == [], "nothing was sent without trust"


def test_tls_flags_are_checked(tmp_path):
    """Said before the model and its data load: here there is no data to load (no data folder,
    an empty Keras cache, no internet), and the message is still about the TLS files."""
    env = {k: v for k, v in os.environ.items() if k != "FEDHUB_DATA_DIR"}
    env["KERAS_HOME"] = str(tmp_path / "keras")
    for args, message in [(["--certfile", "x.pem"], "--certfile and --keyfile go together"),
                          (["--certfile", str(tmp_path / "no.pem"), "--keyfile", str(tmp_path / "no.key"),
                            "--state-dir", str(tmp_path / "s"), "--test-limit", "10"], "TLS file not found")]:
        out = subprocess.run([sys.executable, "server.py", "0", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env=env)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr


def test_tls_server_refuses_in_json(server_factory, tls_files):
    """cheroot's own refusals (before the app sees the request) have the app's JSON shape."""
    server = server_factory("--certfile", str(tls_files["cert"]), "--keyfile", str(tls_files["key"]),
                            "--test-limit", "200", verify=str(tls_files["ca"])).start()
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    host, port = server.url.removeprefix("https://").split(":")

    def raw(request: bytes) -> tuple[str, dict[str, str], dict]:
        with socket.create_connection((host, int(port)), timeout=10) as plain, \
                context.wrap_socket(plain, server_hostname=host) as tls:
            tls.sendall(request)
            response = http.client.HTTPResponse(tls)
            response.begin()
            return response.status, dict(response.getheaders()), json.loads(response.read())

    status, headers, body = raw(b"NOT A REQUEST LINE\r\n\r\n")
    assert status == 400 and headers["Content-Type"] == "application/json", (status, headers)
    assert body["error"] == "bad_request" and body["message"], body
    too_big = 1 << 40
    status, headers, body = raw(b"POST /api/devices/register HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: %d\r\n\r\n" % too_big)
    assert status == 413 and body["field"] == "body", (status, body)
    assert server.get("/health").status_code == 200
