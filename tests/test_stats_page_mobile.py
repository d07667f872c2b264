"""The live accuracy page (/stats) on a phone, light and dark, in Debian's Chromium.

A phone is 390 CSS pixels wide: the page must fit it (no sideways scrolling of the page;
a wide table scrolls inside its own box), and it follows the system's colour scheme
(``prefers-color-scheme``), its charts included, also when the system switches while the
page is open.
"""

from __future__ import annotations

import pytest

from tests.chromium import chromium
from tests.conftest import ServerProcess, wait_until
from tests.rounds_by_hand import enroll, train_rounds

PHONE = {"width": 390, "height": 844}
ROUNDS = 3
# A device's own words about its data: long, and with a long unbroken word, as they come.
PROBLEM = ("labels must be in 0..9 but the file holds 4_294_967_295 in row 17 of "
           "/home/someone/very/long/path/to/the/device/data/folder/train.npz")

WIDTHS = "() => [document.documentElement.scrollWidth, window.innerWidth]"
# The relative luminance (0 black .. 1 white) of an element's computed CSS colour property.
LUMINANCE = """([selector, property]) => {
  const value = getComputedStyle(document.querySelector(selector))[property];
  const [r, g, b] = value.match(/[\\d.]+/g).map(Number).map((c) => c / 255);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}"""
# The colour the accuracy chart gives its axis labels, as luminance.
CHART_TEXT = """() => {
  const colour = Chart.getChart('accuracy-chart').scales.x.options.ticks.color;
  const probe = document.createElement('span');
  probe.style.color = colour;
  document.body.appendChild(probe);
  const [r, g, b] = getComputedStyle(probe).color.match(/[\\d.]+/g).map(Number).map((c) => c / 255);
  probe.remove();
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}"""
ROUNDS_SHOWN = "() => document.querySelectorAll('#rounds tr').length"


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def server(tmp_path, data_dir):
    """A real server with three completed rounds, a device that reported them, and a device
    refused for invalid data (the widest row the page shows)."""
    server = ServerProcess(tmp_path, data_dir, "--test-limit", "200", "--min-devices", "1",
                           "--no-tensorboard").start()
    try:
        token = enroll(server, "phone-device-with-a-long-name")
        train_rounds(server, "phone-device-with-a-long-name", token, ROUNDS)
        enroll(server, "broken", problems=(PROBLEM,))
        yield server
    finally:
        server.stop()


def open_phone_page(browser, url: str, scheme: str):
    page = browser.new_page(viewport=PHONE, color_scheme=scheme, device_scale_factor=2, is_mobile=True,
                            has_touch=True)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    wait_until(lambda: page.evaluate(ROUNDS_SHOWN) == ROUNDS, 30, "the rounds table", interval=0.25)
    wait_until(lambda: page.locator("#devices tr").count() == 2, 30, "the devices table", interval=0.25)
    return page, problems


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_page_fits_a_phone_and_follows_the_colour_scheme(browser, server, scheme, tmp_path):
    page, problems = open_phone_page(browser, f"{server.url}/stats", scheme)
    scroll_width, viewport = page.evaluate(WIDTHS)
    assert viewport == PHONE["width"] and scroll_width <= viewport, (scroll_width, viewport)
    # the two charts one under the other, each within the screen
    for canvas in ("accuracy-chart", "loss-chart"):
        box = page.locator(f"#{canvas}").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport, (canvas, box)
    # the widest table scrolls in its own box, not the page
    devices_box = page.locator("#devices").locator("xpath=ancestor::div[@class='table-box']")
    assert devices_box.count() == 1
    assert devices_box.bounding_box()["width"] <= viewport

    background = page.evaluate(LUMINANCE, ["body", "backgroundColor"])
    text = page.evaluate(LUMINANCE, ["h1", "color"])
    chart_text = page.evaluate(CHART_TEXT)
    if scheme == "dark":
        assert background < 0.1 and text > 0.7 and chart_text > 0.55, (background, text, chart_text)
    else:
        assert background > 0.9 and text < 0.2 and chart_text < 0.55, (background, text, chart_text)
    page.screenshot(path=str(tmp_path / f"stats-phone-{scheme}.png"), full_page=True)
    assert problems == []


@pytest.mark.slow
def test_charts_follow_a_switch_of_the_system_scheme(browser, server):
    page, problems = open_phone_page(browser, f"{server.url}/stats", "light")
    assert page.evaluate(CHART_TEXT) < 0.55
    page.emulate_media(color_scheme="dark")
    wait_until(lambda: page.evaluate(CHART_TEXT) > 0.55, 10, "the charts' dark colours", interval=0.1)
    assert page.evaluate(LUMINANCE, ["body", "backgroundColor"]) < 0.1
    page.emulate_media(color_scheme="light")
    wait_until(lambda: page.evaluate(CHART_TEXT) < 0.55, 10, "the charts' light colours", interval=0.1)
    assert problems == []
