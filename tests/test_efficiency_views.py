"""The efficiency figure as the dashboards show it (issue 23): one process's time for a round's
images over the round's own time.

* fast: the shaping without a browser or a server (fedhub/dashboard/efficiency.py): entries with
  and without ``efficiency``, older runs (no key), None, malformed values; the texts of the tile,
  its tooltip and the table's cells; the Streamlit metric and table drawn in-process (AppTest)
  from hand-made entries;
* slow, in Debian's Chromium: the live page (/stats) against a stand-in serving hand-made
  entries (the card hidden for a run without the figure, the column's dashes), and against a real
  server with ``--efficiency`` and real devices, two rounds: the tile, its tooltip and the Rounds
  table's column say what the history says; the Streamlit metric drawn from the same answers.

The entries are written in the schema of ``GET /api/history`` and ``GET /api/status``; the static
page's JavaScript, which shapes and writes the same data, must agree with the Python text exactly.
"""

from __future__ import annotations

import json
import math

import pytest
from streamlit.testing.v1 import AppTest

from fedhub.dashboard import efficiency as eff

REFERENCE = {"s_per_image": 0.0004, "images": 2048, "seconds": 0.8192, "startup_s": 1.25,
             "framework": "keras", "network": "basic"}


def figure(images: int, round_s: float, ratio: float | None = None, test_s: float | None = 0.05) -> dict:
    """An entry's figure as the engine writes it (at 0.0004 s per image, unless ``ratio``)."""
    centralized = images * 0.0004
    return {"images": images, "round_s": round_s, "centralized_s": centralized,
            "ratio": centralized / round_s if ratio is None else ratio, "test_s": test_s}


def entry(r: int, efficiency: dict | str | None = "absent", accuracy: float = 0.7) -> dict:
    """A history entry; ``efficiency`` "absent" leaves the key out, as an older run's entries do."""
    out = {"round": r, "started_at": 1000.0 + 10 * r, "closed_at": 1005.0 + 10 * r, "num_updates": 2,
           "num_examples": 600, "test_loss": 1 - accuracy, "test_accuracy": accuracy, "devices": {}}
    if efficiency != "absent":
        out["efficiency"] = efficiency
    return out


def three_rounds() -> list[dict]:
    """Round 1 slow (the devices' start-up), then two steady rounds."""
    return [entry(1, figure(1200, 4.8)), entry(2, figure(1200, 0.8)), entry(3, figure(1200, 0.6))]


# --------------------------------------------------------------------------- the shaping


def test_an_entrys_figure_with_and_without_efficiency():
    assert eff.figure(entry(1, figure(1200, 0.8))) == {
        "images": 1200, "round_s": 0.8, "centralized_s": pytest.approx(0.48), "ratio": pytest.approx(0.6),
        "test_s": 0.05}
    # an older run's figure has no test_s; one whose server had no test set has None
    for test_s in ("absent", None, "0.05", math.nan):
        found = figure(1200, 0.8)
        if test_s == "absent":
            del found["test_s"]
        else:
            found["test_s"] = test_s
        assert eff.figure(entry(1, found))["test_s"] is None, test_s
    assert eff.figure(entry(1)) is None  # an older run: no key at all
    assert eff.figure(entry(1, None)) is None  # a run without --efficiency
    for bad in ("fast", [0.5], {"ratio": None}, {"ratio": "0.5"}, {"ratio": True}, {"ratio": math.nan},
                {"ratio": math.inf}, {"ratio": -0.1}, {}):
        assert eff.figure(entry(1, bad)) is None, bad
    for not_an_entry in (None, "round 1", [1, 2], 3):
        assert eff.figure(not_an_entry) is None
    # a figure missing its other fields still has its ratio
    assert eff.figure(entry(2, {"ratio": 0.5, "images": 2.5, "round_s": "slow"})) == {
        "images": None, "round_s": None, "centralized_s": None, "ratio": 0.5, "test_s": None}


def test_rows_give_every_round_a_value_or_none():
    history = [entry(1), entry(2, None), entry(3, figure(600, 1.2)), "not an entry", None]
    rows = eff.rows(history)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"round": 1, **dict.fromkeys(eff.FIELDS)}
    assert rows[1] == {"round": 2, **dict.fromkeys(eff.FIELDS)}
    assert rows[2]["ratio"] == pytest.approx(0.2) and rows[2]["images"] == 600
    assert eff.rows([]) == []
    json.dumps(rows)  # plain data


def test_the_summary_gives_the_latest_the_first_and_the_steady_figure():
    found = eff.summarize(three_rounds())
    assert found.count == 3
    assert (found.latest["round"], found.latest["ratio"]) == (3, pytest.approx(0.8))
    assert (found.first["round"], found.first["ratio"]) == (1, pytest.approx(0.1))
    assert found.steady == pytest.approx(0.8)  # the upper median of 0.6 and 0.8, as fedhub.simulate's
    one = eff.summarize([entry(1, figure(1200, 4.8))])
    assert one.count == 1 and one.steady is None and one.first == one.latest
    # rounds without the figure are skipped: an older run's entries, a round of None
    mixed = eff.summarize([entry(1), entry(2, figure(1200, 2.4)), entry(3, None)])
    assert (mixed.count, mixed.latest["round"], mixed.first["round"]) == (1, 2, 2)
    for nothing in ([], [entry(1), entry(2)], [entry(1, None)], [None, "x"]):
        assert eff.summarize(nothing) is None, nothing


def test_the_reference_from_the_status():
    assert eff.reference({"efficiency": REFERENCE}) == {
        "s_per_image": 0.0004, "images": 2048, "seconds": 0.8192, "startup_s": 1.25, "framework": "keras",
        "network": "basic"}
    assert eff.reference({"efficiency": None}) is None  # off
    assert eff.reference({"status": "idle"}) is None  # an older server: no key
    assert eff.reference(None) is None
    for bad in ({"s_per_image": 0}, {"s_per_image": -1.0}, {"s_per_image": True}, {"images": 2048}, "fast"):
        assert eff.reference({"efficiency": bad}) is None, bad
    partial = eff.reference({"efficiency": {"s_per_image": 0.001, "framework": 3}})
    assert partial == {"s_per_image": 0.001, "images": None, "seconds": None, "startup_s": None,
                       "framework": None, "network": None}


def test_the_texts():
    assert [eff.ratio_text(r) for r in (0.6612, 1.5, 0.1, 0.0, 0.0432, 0.00431, None)] == [
        "0.66×", "1.50×", "0.10×", "0.00×", "0.043×", "0.0043×", "—"]
    assert eff.tile_text(eff.summarize(three_rounds())) == "0.80× one process"
    assert eff.tile_text(None) == "—" == eff.metric_text(None)
    assert eff.metric_text(eff.summarize(three_rounds())) == "0.80×"
    assert eff.first_text(eff.summarize(three_rounds())) == "round 1: 0.10× with start-up"
    assert eff.first_text(eff.summarize(three_rounds()[:1])) == "" and eff.first_text(None) == ""
    assert [eff.cell_text(e) for e in (entry(1), entry(2, None), entry(3, figure(1200, 0.6)))] == [
        "—", "—", "0.80×"]


def test_the_explanation_says_what_the_figure_is_and_how_one_process_was_timed():
    reference = eff.reference({"efficiency": REFERENCE})
    assert eff.explain(eff.summarize(three_rounds()), reference) == (
        f"{eff.WHAT} Round 3: one process would train its 1200 images in 0.48 s; the round took 0.60 s "
        "(0.05 s of it testing the new model). One process was timed at start-up on 2048 test images: "
        "2500 images/s (its own start-up, 1.25 s, "
        "not counted). Round 1, with the devices' start-up: 0.10×; the median of the rounds after it: 0.80×.")
    # one round: it carries the start-up; a past run (no reference): nothing of the timing
    assert eff.explain(eff.summarize([entry(1, figure(1200, 4.8, test_s=None))]), None) == (
        f"{eff.WHAT} Round 1: one process would train its 1200 images in 0.48 s; the round took 4.80 s. "
        "This first round's time includes the devices' start-up.")
    # on, before any round
    assert eff.explain(None, reference).endswith("2500 images/s (its own start-up, 1.25 s, not counted). "
                                                 "Each round's figure comes when it completes.")
    assert eff.explain(None, None) == ""


# --------------------------------------------------------------------------- the Streamlit side


def training_script(status_json: str, history_json: str) -> None:
    import json

    from fedhub.dashboard.page import training_panel

    class NoServer:
        """The buttons' calls; none is pressed here."""

        server = "http://stand-in"
        admin_token = None

        def __getattr__(self, name: str):
            return lambda *args, **kwargs: None

    training_panel(NoServer(), json.loads(status_json), json.loads(history_json))


def a_status(efficiency: dict | str | None = "absent") -> dict:
    out = {"status": "finished", "mode": "sync", "completed_rounds": 3, "total_rounds": 3, "round": None,
           "reason": "", "strategy": {"name": "fedavg", "params": {}}, "compression": None, "privacy": None,
           "devices": {"idle": 2}}
    if efficiency != "absent":
        out["efficiency"] = efficiency
    return out


def open_training(status: dict, history: list) -> AppTest:
    at = AppTest.from_function(training_script, args=(json.dumps(status), json.dumps(history)),
                               default_timeout=30).run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict:
    return {m.label: m for m in at.metric}


def test_the_training_panel_shows_the_latest_efficiency_with_the_first_in_its_help():
    history = three_rounds()
    at = open_training(a_status(REFERENCE), history)
    shown = metrics(at)
    metric = shown["Efficiency"]
    assert metric.value == "0.80×"  # "one process": in its help, a metric's column is narrow
    expected = eff.explain(eff.summarize(history), eff.reference({"efficiency": REFERENCE}))
    assert metric.proto.help == expected
    assert "Round 1, with the devices' start-up: 0.10×" in metric.proto.help


def test_the_training_panel_without_efficiency_has_no_such_metric():
    for status, history in ((a_status(), [entry(1), entry(2)]), (a_status(None), [entry(1, None)])):
        at = open_training(status, history)
        assert "Efficiency" not in metrics(at) and "Status" in metrics(at)
    # on, before round 1: a dash, and the help says how one process was timed
    at = open_training(a_status(REFERENCE), [])
    metric = metrics(at)["Efficiency"]
    assert metric.value == "—" and "2048 test images: 2500 images/s" in metric.proto.help


def panel_script(history_json: str, asynchronous: bool) -> None:
    import json

    from fedhub.dashboard.page import efficiency_panel

    efficiency_panel(json.loads(history_json), asynchronous)


def open_panel(history: list, asynchronous: bool = False) -> AppTest:
    at = AppTest.from_function(panel_script, args=(json.dumps(history), asynchronous),
                               default_timeout=30).run()
    assert not at.exception, at.exception
    return at


def test_the_results_panel_lists_each_rounds_efficiency_newest_first():
    history = [entry(1, figure(1200, 4.8)), entry(2, None), entry(3, figure(1200, 0.6))]
    at = open_panel(history)
    assert [h.value for h in at.subheader] == ["Efficiency"]
    assert any("0.80× one process" in c.value for c in at.caption)
    (frame,) = [t.value for t in at.dataframe]
    assert list(frame.columns) == ["round", "images", "round time (s)", "of it, testing (s)",
                                   "one process (s)", "efficiency"]
    assert frame["of it, testing (s)"][0] == pytest.approx(0.05)
    assert list(frame["round"]) == [3, 2, 1]
    assert frame["efficiency"][0] == pytest.approx(0.8) and frame["efficiency"].isna()[1]
    assert frame["efficiency"][2] == pytest.approx(0.1)
    assert list(frame["images"].isna()) == [False, True, False]
    at = open_panel(history, asynchronous=True)
    assert at.dataframe[0].value.columns[0] == "model version"


def test_the_results_panel_draws_nothing_for_a_run_without_efficiency():
    for history in ([], [entry(1), entry(2)], [entry(1, None)]):
        at = open_panel(history)
        assert not at.subheader and not at.dataframe and not at.caption, history


# --------------------------------------------------------------------------- in Chromium

CARD = """() => {
  const card = document.getElementById('efficiency-card');
  return { hidden: card.hidden, shown: card.offsetParent !== null,
           value: document.getElementById('efficiency').textContent,
           first: document.getElementById('efficiency-first').textContent, title: card.title,
           what: document.getElementById('efficiency-what').textContent };
}"""
# The Rounds table's header, and each row's Efficiency cell (newest first).
COLUMN = """() => {
  const heads = [...document.getElementById('rounds-key').closest('tr').cells].map((th) => th.textContent);
  const at = heads.indexOf('Efficiency');
  const rows = [...document.querySelectorAll('#rounds tr')];
  return { heads: heads, cells: rows.map((tr) => tr.cells[at].textContent) };
}"""


def assert_page_says(page, history: list[dict], status: dict | None) -> None:
    """The card and the column say what fedhub.dashboard.efficiency says of these answers."""
    summary = eff.summarize(history)
    reference = eff.reference(status)
    card = page.evaluate(CARD)
    assert card["value"] == eff.tile_text(summary), card
    assert card["title"] == card["what"] == eff.explain(summary, reference), card
    assert card["first"] == eff.first_text(summary), card
    column = page.evaluate(COLUMN)
    assert column["heads"][-2:] == ["Efficiency", "Secure aggregation"], column  # the last stays last
    assert column["cells"] == [eff.cell_text(e) for e in reversed(history)], column


@pytest.mark.slow
def test_the_page_shapes_hand_made_entries_as_the_dashboard_does(tmp_path):
    from tests.chromium import chromium, wait_js
    from tests.test_federated_eval_browser import StandIn
    from tests.test_stats_page import STATS_DIR, open_page

    class WithEfficiency(StandIn):
        reference: dict | None = None

        def answer(self, path: str):
            body = super().answer(path)
            if path == "/api/status":
                body["efficiency"] = self.reference
            return body

    server = WithEfficiency()
    try:
        with chromium() as browser:
            # an older run: no figure anywhere, no reference: no card, a dash in each row
            server.history = [entry(1), entry(2)]
            page, problems = open_page(browser, (STATS_DIR / "index.html").as_uri() + f"?server={server.url}")
            wait_js(page, "() => document.querySelectorAll('#rounds tr').length === 2", what="two rounds")
            card = page.evaluate(CARD)
            assert card["hidden"] and not card["shown"], card
            assert page.evaluate(COLUMN)["cells"] == ["—", "—"]

            # on: the card at once (a dash, the timing in its tooltip), then the rounds' figures
            server.reference = REFERENCE
            wait_js(page, "() => !document.getElementById('efficiency-card').hidden", what="the card")
            assert_page_says(page, server.history, {"efficiency": REFERENCE})
            history = [entry(1, None), *three_rounds()[1:], entry(4, figure(1200, 0.75, ratio=0.0432))]
            server.history = history
            wait_js(page, "() => document.querySelectorAll('#rounds tr').length === 4", what="four rounds")
            wait_js(page, "() => document.getElementById('efficiency').textContent === '0.043× one process'",
                    what="round 4's figure")
            assert_page_says(page, history, {"efficiency": REFERENCE})
            assert page.evaluate(COLUMN)["cells"] == ["0.043×", "0.80×", "0.60×", "—"]
            assert page.evaluate(CARD)["first"] == "round 2: 0.60× with start-up"
            page.screenshot(path=str(tmp_path / "efficiency-desktop.png"), full_page=True)

            # a phone: the card and the wider table fit, the table scrolls in its own box
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                     device_scale_factor=2)
            phone.goto((STATS_DIR / "index.html").as_uri() + f"?server={server.url}")
            wait_js(phone, "() => !document.getElementById('efficiency-card').hidden", what="the card")
            scroll_width, viewport = phone.evaluate(
                "() => [document.documentElement.scrollWidth, window.innerWidth]")
            assert scroll_width <= viewport == 390, (scroll_width, viewport)
            box = phone.locator("#efficiency-card").bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= viewport, box
            phone.screenshot(path=str(tmp_path / "efficiency-phone.png"), full_page=True)
            assert problems == [], problems
    finally:
        server.close()


ROUNDS = 2
SERVER_ARGS = ("--efficiency", "--test-limit", "300", "--min-devices", "2", "--rounds", str(ROUNDS),
               "--auto-activate", "--start", "--no-tensorboard")


@pytest.mark.slow
def test_a_real_run_shows_its_efficiency(tmp_path, data_dir, split_devices):
    from tests.chromium import chromium, wait_js
    from tests.conftest import ServerProcess, launch_devices, stop_processes, wait_until
    from tests.test_stats_page import open_page

    root = split_devices(2, limit=300)
    server = ServerProcess(tmp_path, data_dir, *SERVER_ARGS).start()
    devices = launch_devices(server, root, ["device1", "device2"])
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 300,
                   f"{ROUNDS} rounds with two devices", interval=1)
        status = server.get("/api/status").json()
        history = server.get("/api/history").json()["rounds"]
        reference = status["efficiency"]
        assert reference is not None and reference["images"] == 300 and reference["s_per_image"] > 0, status
        assert len(history) == ROUNDS
        for r in history:
            e = r["efficiency"]
            assert e["images"] == r["num_examples"] > 0, r  # one epoch
            assert e["ratio"] == pytest.approx(e["centralized_s"] / e["round_s"]) and e["ratio"] > 0, e
            assert e["round_s"] == pytest.approx(r["closed_at"] - r["started_at"]), (e, r)
            assert 0 < e["test_s"] < e["round_s"], e  # the server's test on its 300 images

        with chromium() as browser:
            page, problems = open_page(browser, f"{server.url}/stats")
            wait_js(page, f"() => document.querySelectorAll('#rounds tr').length === {ROUNDS}",
                    what="the rounds")
            wait_js(page, "() => !document.getElementById('efficiency-card').hidden",
                    what="the Efficiency card")
            assert_page_says(page, history, status)
            card = page.evaluate(CARD)
            latest = eff.ratio_text(history[-1]["efficiency"]["ratio"])
            assert card["shown"] and card["value"] == f"{latest} one process", card
            assert page.evaluate(COLUMN)["cells"] == [
                eff.ratio_text(r["efficiency"]["ratio"]) for r in reversed(history)]
            page.screenshot(path=str(tmp_path / "efficiency-real.png"), full_page=True)
            assert problems == [], problems
    finally:
        stop_processes(devices)
        server.stop()

    # the Streamlit dashboard's metric from the same answers
    metric = metrics(open_training(status, history))["Efficiency"]
    assert metric.value == eff.metric_text(eff.summarize(history))
    assert metric.proto.help == eff.explain(eff.summarize(history), eff.reference(status))
