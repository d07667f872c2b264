"""Debian's Chromium (``apt-get install chromium``), driven by Playwright for Python through
``executable_path``: no browser download."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser, closed at the end."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is needed: apt-get install chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_js(page: Any, expression: str, arg: Any = None, timeout: float = 30.0, what: str = "") -> None:
    """Poll a JS predicate from Python. Playwright's wait_for_function evaluates a string with eval
    once it has to poll, and the pages' Content-Security-Policy (rightly) forbids eval."""
    from tests.conftest import wait_until

    wait_until(lambda: page.evaluate(expression, arg), timeout, what or expression, interval=0.25)
