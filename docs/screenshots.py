"""Take the README's dashboard screenshots from a real federated run.

``python docs/screenshots.py`` splits Fashion-MNIST over three device folders, starts the
server and three device processes on loopback, plus one device whose data folder is empty
(refused as invalid, so the pictures show a lifecycle problem and its ERROR log), trains a
few rounds (taking one device out half-way, so the pictures show that too), starts the
Streamlit dashboard, and photographs it and the live accuracy page with Debian's Chromium through Playwright:
``docs/dashboard.png`` and ``docs/stats.png``. Everything runs in a temporary folder and
is stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from fedhub.demo import wait_for_server
from fedhub.device.launcher import launch, stop
from fedhub.server_process import free_port
from fedhub.split import (
    DatasetError,
    load_fashion_mnist,
    split_to_devices,
    write_device_data,
)

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ADMIN_TOKEN = "screenshot-admin-token"
ENROLL_SECRET = "screenshot-enroll-secret"
EMPTY_DEVICE = "empty"  # a device with no data: the server refuses it and says why


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


class Run:
    """A server and its devices, driven through the admin API."""

    def __init__(self, work: Path, data_dir: str | None, devices: int, per_device: int) -> None:
        self.work = work
        self.env = {**os.environ, "FEDHUB_ADMIN_TOKEN": ADMIN_TOKEN, "FEDHUB_ENROLL_SECRET": ENROLL_SECRET}
        self.devices_root = work / "devices"
        self.names = list(split_to_devices(self.devices_root, devices, data_dir=data_dir,
                                           limit=per_device, progress=False))
        write_device_data(self.devices_root, EMPTY_DEVICE, np.zeros((0, 28, 28), np.uint8),
                          np.zeros(0, np.uint8))
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, str(ROOT / "server.py"), "--port", self.url.rsplit(":", 1)[1],
               "--state-dir", str(work / "state"), "--eval-dir", str(work / "eval"),
               "--test-limit", "2000", "--min-devices", "1", "--rounds", "0", "--epochs", "1"]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        with open(work / "server.log", "ab") as log:
            self.server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        self.procs: list[subprocess.Popen] = []

    def admin(self, method: str, path: str, **kw) -> dict:
        r = requests.request(method, self.url + path, timeout=30,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kw)
        r.raise_for_status()
        return r.json()

    def status(self) -> dict:
        return requests.get(f"{self.url}/api/status", timeout=10).json()

    def train_until(self, rounds: int) -> None:
        self.admin("POST", "/api/training/start")
        wait_for(lambda: self.status()["completed_rounds"] >= rounds, 600, f"round {rounds}")
        self.admin("POST", "/api/training/pause")
        wait_for(lambda: self.status()["round"] is None, 120, "the round in progress")

    def start(self, rounds: int) -> None:
        wait_for_server(self.url, self.server)
        self.procs = launch(self.url, self.names, devices_root=self.devices_root, env=self.env,
                            extra_args=["--auto-activate"], log_dir=self.work)
        wait_for(lambda: self.status()["devices"].get("idle") == len(self.names), 120, "the devices")
        # the last device leaves half-way: its line stops, and the table shows it inactive
        self.train_until(rounds // 2)
        self.admin("POST", f"/api/devices/{self.names[-1]}/deactivate")
        self.train_until(rounds)
        # last, so that its ERROR line is among the newest in the dashboard's logs
        empty = launch(self.url, [EMPTY_DEVICE], devices_root=self.devices_root, env=self.env,
                       extra_args=["--auto-activate"], log_dir=self.work)[0]
        if empty.wait(120) != 1:
            raise RuntimeError(f"the device with no data exited {empty.returncode}, not 1 (refused)")

    def close(self) -> None:
        stop(self.procs)
        stop([self.server])


def sample_picture(data_dir: str | None) -> bytes:
    """A Fashion-MNIST test image, enlarged to 280x280 like a picture someone would upload."""
    from PIL import Image

    _, (x_test, _) = load_fashion_mnist(data_dir)
    buf = io.BytesIO()
    Image.fromarray(x_test[0]).resize((280, 280), Image.Resampling.LANCZOS).save(buf, "PNG")
    return buf.getvalue()


def streamlit(run: Run, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "index.py"),
           "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    env = {**run.env, "FEDHUB_SERVER": run.url, "FEDHUB_DEVICES_ROOT": str(run.devices_root)}
    with open(run.work / "streamlit.log", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


TABS = ("Run", "Results", "Predict", "Robustness and logs")  # dashboard/index.py's tabs


def photograph(run: Run, dashboard_url: str, picture: Path, out: Path) -> None:
    """``dashboard.png``: each of the dashboard's tabs, photographed in turn and stacked (the
    page is in tabs), with a prediction in the Predict tab; ``stats.png``: the live page."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    rounds = run.status()["completed_rounds"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(dashboard_url)
            page.get_by_text(f"Devices ({len(run.names) + 1})").wait_for(timeout=60_000)
            shots = []
            for tab in TABS:
                page.set_viewport_size({"width": 1400, "height": 1000})
                page.get_by_role("tab", name=tab).click()
                if tab == "Predict":
                    page.locator("input[type=file]").set_input_files(str(picture))
                    page.get_by_text("what the model saw").wait_for(timeout=60_000)
                page.wait_for_timeout(3000)  # charts finish drawing
                # Streamlit scrolls inside its own container: make the window as tall as the content
                height = page.evaluate("document.querySelector('[data-testid=\"stMainBlockContainer\"]')"
                                       ".scrollHeight")
                page.set_viewport_size({"width": 1400, "height": int(height) + 40})
                page.wait_for_timeout(1500)
                shots.append(Image.open(io.BytesIO(page.screenshot())))
            stacked = Image.new("RGB", (max(s.width for s in shots), sum(s.height for s in shots)), "white")
            top = 0
            for shot in shots:
                stacked.paste(shot, (0, top))
                top += shot.height
            stacked.save(out / "dashboard.png", optimize=True)

            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.goto(f"{run.url}/stats")
            page.locator("#rounds tr").nth(rounds - 1).wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "stats.png"), full_page=True)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python docs/screenshots.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (else $FEDHUB_DATA_DIR)")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--per-device", type=int, default=2000, help="training examples per device")
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: {CHROMIUM} not found (apt-get install chromium)", file=sys.stderr)
        return 2
    if a.devices < 2 or a.rounds < 2:
        p.error("--devices and --rounds must be at least 2")
    with tempfile.TemporaryDirectory(prefix="fedhub-screenshots-") as tmp:
        work = Path(tmp)
        try:
            run = Run(work, a.data_dir, a.devices, a.per_device)
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        dashboard = None
        try:
            print(f"training {a.rounds} rounds on {a.devices} devices at {run.url}", flush=True)
            run.start(a.rounds)
            picture = work / "ankle-boot.png"
            picture.write_bytes(sample_picture(a.data_dir))
            port = free_port()
            dashboard = streamlit(run, port)
            wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 60, "the dashboard")
            a.out.mkdir(parents=True, exist_ok=True)
            photograph(run, f"http://127.0.0.1:{port}", picture, a.out)
        except (RuntimeError, requests.RequestException) as exc:
            for log in sorted(work.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if dashboard is not None:
                stop([dashboard])
            run.close()
    print(f"wrote {a.out / 'dashboard.png'} and {a.out / 'stats.png'}")
    return 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
