"""FedHub control dashboard: ``streamlit run dashboard/index.py``.

Watch and drive a federation through the server's HTTP API: the devices with their state
and lifecycle (activate or deactivate each, interrupt one's local training), start / pause /
resume / reset, the current round's progress, the global and per-device accuracy and loss over
rounds (of the current run, live, or of a past one), failed updates, the devices' logs (admin
token), the latest global model's confusion matrix on the test set, a model download, local
demo devices, predictions for an uploaded picture, and the runs: a new run with chosen
settings, and runs compared (their curves on one chart, their settings side by side). The
server URL and admin token come from the sidebar, else from ``FEDHUB_SERVER`` /
``FEDHUB_ADMIN_TOKEN``, else ``http://127.0.0.1:4000`` and the local server's ``admin.token``
in the state directory (``-- --state-dir DIR`` after the script, else ``FEDHUB_STATE_DIR``,
else ``server_training/``: see :mod:`fedhub.state_dir`); ``FEDHUB_CA`` names a CA bundle for
an HTTPS server with a private CA. Local demo devices train on the state directory's
``devices/`` unless ``FEDHUB_DEVICES_ROOT`` says otherwise.

The server may be down or restarting at any moment: every call's failure becomes a banner
with a retry button, never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image

from fedhub import state_dir as state
from fedhub.api.app import MAX_IMAGE_BYTES
from fedhub.dashboard import efficiency as eff
from fedhub.dashboard import federated_eval as fed_eval
from fedhub.dashboard import runs as run_settings
from fedhub.dashboard.local_devices import LocalDevices, device_names, missing_data
from fedhub.dashboard.server_api import (
    DEFAULT_SERVER,
    ServerAPI,
    ServerError,
    TLSError,
    Unreachable,
    default_admin_token,
)
from fedhub.engine.lifecycle import STATES as LIFECYCLE_STATES
from fedhub.engine.plural import plural

log = logging.getLogger("fedhub.dashboard")
T = TypeVar("T")

GLOBAL_SERIES = "global model (test set)"
GLOBAL_COLOUR = "#1c7ed6"
WORST_COLOUR = "#1864ab"  # the worst 10 % of devices: GLOBAL_COLOUR, darker
PERSONAL_COLOUR = "#e8590c"  # personal models, beside the global one
SERVER_COLOUR = "#868e96"  # the server's own test accuracy, for comparison
DEVICE_COLOURS = ["#e8590c", "#2f9e44", "#9c36b5", "#1098ad", "#f08c00", "#c2255c",
                  "#5c940d", "#3b5bdb", "#862e9c", "#0b7285"]
PICTURE_TYPES = ["png", "jpg", "jpeg", "bmp", "gif", "webp"]
# The uploader's limit is the server's default predict body limit (server.py --max-image-mb).
MAX_PICTURE_MB = MAX_IMAGE_BYTES // (1024 * 1024)
REFRESH_SECONDS = 2.0
LOG_LEVELS = ("INFO", "WARNING", "ERROR")
LOG_ROWS = 200  # the latest log lines kept and shown
LOG_PAGE = 1000  # the server's largest page of log lines
LOG_PAGES_PER_REFRESH = 20  # catching up on a long log is spread over refreshes
DEVICES_PER_PAGE = 25  # a thousand devices are paged and filtered, not drawn
CHART_DEVICES = 5  # devices drawn in the charts beside the global model until others are chosen
ALL = "all"
ACTIVATION = {ALL: None, "active": True, "inactive": False}
# Row highlights, translucent so that they read on the light and the dark theme alike.
RED = "background-color: rgba(250, 82, 82, 0.28)"
AMBER = "background-color: rgba(250, 176, 5, 0.28)"
LIFECYCLE_HIGHLIGHT = {"invalid": RED, "interrupted": AMBER}
LEVEL_HIGHLIGHT = {"ERROR": RED, "WARNING": AMBER}
BLANK = "–"  # what an empty table cell shows (Streamlit's own is the word "None")
# Below this probability a prediction is shown as a guess, not as an answer: ten classes make
# 10 % pure chance, and a photo unlike the training data often gets 30 % for some class.
SURE = 0.6
MODEL_INPUT_ZOOM = 10  # the picture the model saw (28x28, 32x32), enlarged 10x with sharp pixels
ATTACKER = "▲ "  # marks a device that declared an attack, wherever it is named
# Every ASCII punctuation mark can be backslash-escaped in Markdown (Streamlit's ``$`` maths and
# ``:emoji:`` shortcodes included); a device's own words then show as typed, never as markup.
MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
# What "cannot talk to the server" looks like: down, restarting, or a certificate we do not trust.
NO_SERVER = (Unreachable, TLSError)


# --------------------------------------------------------------------------- messages


def refusal(exc: ServerError) -> str:
    """A server refusal in words a person can act on."""
    message = exc.body.get("message") or str(exc)
    if exc.status in (401, 403):
        return f"The server refused the admin token ({message}). Set the right one in the sidebar."
    return f"The server refused: {message} (HTTP {exc.status})"


def flash(kind: str, text: str, where: str = "controls", while_status: str | None = None) -> None:
    """Keep the outcome of a button until the user dismisses it or acts again.

    One message at a time (the latest action's), shown beside the buttons that made it
    (``where``): the live refresh draws it again rather than dropping it. ``while_status``:
    the message is about the run being in this state ("training started": running) and goes
    by itself once the run has left it, so a finished run does not still say it started.
    """
    st.session_state["flash"] = (kind, text, where, while_status)


def dismiss() -> None:
    st.session_state.pop("flash", None)


def show_flash(where: str = "controls", status: str | None = None) -> None:
    """The latest action's outcome, if it was made ``where`` and still true in run ``status``."""
    message = st.session_state.get("flash")
    if not message or message[2] != where:
        return
    kind, text, _, while_status = message
    if while_status is not None and status is not None and status != while_status:
        dismiss()
        return
    row = st.container(horizontal=True, vertical_alignment="center")
    (row.success if kind == "success" else row.error)(text)
    row.button("Dismiss", key=f"dismiss-{where}", icon=":material/close:", type="tertiary",
               on_click=dismiss)


def is_local(server: str) -> bool:
    """An http server on this machine: the one the README's commands start."""
    parts = urlsplit(server)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost")


def server_command(server: str) -> str:
    """How to start the server at the URL set in the sidebar (its port, not the README's)."""
    if is_local(server):
        return f"`python server.py {urlsplit(server).port or 80}`"
    return f"the FedHub server at {server}"


def device_command(server: str, name: str = "device1") -> str:
    """How to start one device against the URL set in the sidebar."""
    if is_local(server):
        return f"`python device/device.py {urlsplit(server).port or 80} {name}`"
    return f"`python device/device.py --server {server} {name}`"


def server_down_banner(api: ServerAPI, exc: Exception, key: str) -> None:
    st.error(
        f"**The FedHub server at {api.server} cannot be reached** ({exc}).\n\n"
        f"Start {server_command(api.server)}, or fix the server URL in the sidebar. "
        "This page keeps working and tries again on Retry (or by itself when live refresh is on).",
        icon=":material/cloud_off:")
    st.button("Retry", key=key, type="primary")


def unexpected(exc: Exception) -> None:
    """Say what happened instead of a traceback; the details go to the dashboard's log."""
    log.exception("dashboard error")
    st.error(f"Something went wrong: {type(exc).__name__}: {exc}. Details are in the dashboard's log.")


def control(call, done: str, while_status: str | None = None) -> None:
    """Run one control call from a button callback; the outcome is shown on the next render
    (``while_status``: only while the run stays in that state, see :func:`flash`)."""
    try:
        call()
    except NO_SERVER as exc:
        flash("error", f"The server cannot be reached: {exc}")
    except ServerError as exc:
        flash("error", refusal(exc))
    else:
        flash("success", done, while_status=while_status)


def read(call: Callable[[], T], what: str) -> T | None:
    """``call()``'s answer, or None once the page has said why ``what`` could not be read."""
    try:
        return call()
    except NO_SERVER as exc:
        st.warning(f"{what} could not be read: {exc}")
    except ServerError as exc:  # 409: the federation's state, not a mistake
        (st.info if exc.status == 409 else st.error)(refusal(exc))
    return None


def table(data: Any, **kwargs: Any) -> None:
    """A table across the page, an empty cell shown as a dash."""
    st.dataframe(data, hide_index=True, width="stretch", placeholder=BLANK, **kwargs)


def as_text(text: str) -> str:
    """Text a device supplied (a data validation problem), shown literally inside Markdown:
    no links, images, maths or markup of its choosing."""
    return MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def ago(epoch_seconds: float | None) -> str:
    if not epoch_seconds:
        return "never"
    seconds = max(0, round(time.time() - epoch_seconds))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch_seconds))


def state_folders() -> state.StateDir:
    """The run's folders, as every command finds them: ``streamlit run dashboard/index.py --
    --state-dir DIR``, else ``$FEDHUB_STATE_DIR``, else the checkout's."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    state.add_option(parser)
    given, _ = parser.parse_known_args(sys.argv[1:])
    return state.resolve(given.state_dir)


# --------------------------------------------------------------------------- sections


def sidebar() -> tuple[ServerAPI, bool]:
    with st.sidebar:
        st.header("Server")
        server = st.text_input("Server URL", key="server",
                               value=os.environ.get("FEDHUB_SERVER") or DEFAULT_SERVER)
        token = st.text_input("Admin token", key="admin_token", type="password",
                              value=os.environ.get("FEDHUB_ADMIN_TOKEN")
                              or default_admin_token(state_folders()),
                              help="Control calls need it; reading and the live charts do not.")
        ca = st.text_input("CA certificate (HTTPS with a private CA)", key="ca",
                           value=os.environ.get("FEDHUB_CA", ""),
                           help="Path to the CA bundle that signed the server's certificate.")
        live = st.toggle(f"Live refresh every {REFRESH_SECONDS:g} s", key="live", value=True)
        st.caption(f"Live accuracy page: {server.rstrip('/')}/stats")
        try:
            api = ServerAPI(server.strip() or DEFAULT_SERVER, token.strip(), ca=ca.strip() or None)
        except ValueError as exc:  # not an address: say so, and nothing else until it is fixed
            st.error(f"Server URL: {exc}")
            st.stop()
    return api, live


READY = ("idle", "training", "uploading")  # device states that count as active and online


def ready_devices(status: dict[str, Any]) -> int:
    """Active devices online now: those a round can select."""
    counts = status.get("devices") or {}
    return sum(counts.get(state, 0) for state in READY)


def round_share(r: dict[str, Any]) -> tuple[float, str]:
    """How far the open round is, 0..1, and in words: reported updates count in full, a device
    still training by its batches done (a round whose devices are at 99 % is nearly done, not 0 %)."""
    selected = max(1, len(r["selected"]))
    training = [p["done"] / p["total"] for name, p in (r.get("progress") or {}).items()
                if p.get("total") and name not in r["reported"]]
    share = min(1.0, (len(r["reported"]) + sum(training)) / selected)
    words = f"round {r['number']}: {len(r['reported'])} of {len(r['selected'])} selected devices reported"
    if training:
        words += " · training " + ", ".join(f"{t:.0%}" for t in sorted(training, reverse=True))
    return share, words + f" ({r['needed']} needed by the deadline)"


def start_advice(status: dict[str, Any], launched: int) -> tuple[str, str]:
    """What Start will train with, as ``(kind, text)``: a warning when fewer devices are ready
    than were launched here (a round opens with whoever is there: ``--min-devices``, 1 by
    default), so that nobody starts a "federation" of one by accident."""
    ready = ready_devices(status)
    with_whom = f"Start trains with the {plural(ready, 'active device')} online now"
    if ready == 0:
        return "warning", ("No active device is online yet: launch some (above) or activate enrolled "
                           "ones (Devices, below); a round opens once one is.")
    if launched > ready:
        return "warning", (f"{with_whom}, but {launched} were launched from this page: the others are "
                           "still starting or inactive. Wait until the Devices table shows them "
                           "active, or rounds run with fewer devices than you launched.")
    return "info", f"{with_whom} (and any that join later)."


def training_panel(api: ServerAPI, status: dict[str, Any],
                   history: list[dict[str, Any]] | None = None) -> None:
    """The run's headline metrics and its controls. ``history``: its completed rounds, for the
    Efficiency metric (a run with ``--efficiency``)."""
    st.subheader("Training")
    state = status["status"]
    total = status["total_rounds"] or "∞"
    r = status["round"]
    cols = st.columns(5)
    figures, reference = eff.summarize(history or []), eff.reference(status)
    if figures is not None or reference is not None:  # a row of its own: a sixth column cuts values
        st.columns(5)[0].metric("Efficiency", eff.metric_text(figures), help=eff.explain(figures, reference))
    cols[0].metric("Status", state)
    if status.get("mode") != "async":
        cols[1].metric("Completed rounds", f"{status['completed_rounds']} / {total}")
    if status.get("mode") == "async":
        buffer = status.get("buffer") or {}
        cols[1].metric("Model version", f"{status['model_version']} / {total}")
        cols[2].metric("Next version", f"v{buffer.get('target', '?')}")
        cols[3].metric("Updates buffered", f"{buffer.get('received', 0)} / {status['buffer_size']}")
        cols[4].metric("Max staleness", status["max_staleness"])
        st.caption("Asynchronous mode (FedBuff): devices train continuously; each update is weighted "
                   "down by its staleness, and a new model version comes every "
                   f"{plural(status['buffer_size'], 'update')} "
                   "(server options --buffer-size, --max-staleness).")
    elif r and "selected" in r:
        reported, selected = len(r["reported"]), len(r["selected"])
        cols[2].metric("Current round", f"#{r['number']}")
        cols[3].metric("Updates received", f"{reported} / {selected}")
        cols[4].metric("Deadline", f"in {r['deadline_in']:.0f} s")
        share, words = round_share(r)
        st.progress(share, text=words)
    elif r:
        cols[2].metric("Current round", f"#{r['number']}")
        cols[3].metric("Updates received", "all")
        cols[4].metric("Deadline", "aggregating")
    else:
        cols[2].metric("Current round", "none open")
    if status.get("reason"):
        st.caption(status["reason"])
    if status.get("last_error"):
        st.warning(status["last_error"])
    strategy = status.get("strategy")
    if strategy:
        st.caption(f"Aggregation: **{as_text(with_settings(strategy['name'], strategy['params']))}** "
                   "(server options --strategy and --strategy-arg)")
    st.caption(f"Updates travel: **{compression_text(status.get('compression'))}** "
               "(server options --compression and --compress-downlink)")
    privacy = status.get("privacy")
    if privacy:
        st.caption(privacy_text(privacy))

    if state == "finished":
        st.info(f"The run is over ({plural(status['completed_rounds'], 'round')} done). To train again, "
                "Reset (a new run with the same settings, from the initial model; this one is kept), "
                "start a New run on the Runs tab, or Start with more rounds in the run.")

    if state != "running" and status.get("mode") != "async":
        kind, advice = start_advice(status, len(local_devices().running()))
        (st.warning if kind == "warning" else st.caption)(advice)
    c1, c2, c3, c4, c5 = st.columns([1, 1, 1, 1, 2])
    follow_total_rounds(status)
    rounds = c5.number_input("Rounds in the run (0: until paused)", key="rounds", min_value=0,
                             max_value=10_000, step=1)
    c1.button("Start", key="start", type="primary", disabled=state == "running", on_click=control,
              args=(lambda: api.start(int(rounds)),
                    f"training started ({plural(rounds, 'round') if rounds else 'until paused'})",
                    "running"))
    c2.button("Pause", key="pause", disabled=state != "running", on_click=control,
              args=(api.pause, "paused: the round in progress still completes", "paused"))
    c3.button("Resume", key="resume", disabled=state != "paused",
              on_click=control, args=(api.resume, "training resumed", "running"))
    c4.button("Reset", key="reset", disabled=state == "idle" and not status["completed_rounds"],
              help="Forget every round and go back to the initial model (asks first).",
              on_click=ask_reset)
    if st.session_state.get("confirm_reset"):
        reset_confirmation(api, status)


def follow_total_rounds(status: dict[str, Any]) -> None:
    """The "Rounds in the run" input shows the server's total whenever that changes (a restart
    with other ``--rounds``, a new run, a Start with more rounds), and what the person typed
    otherwise: a widget's value alone would keep the first total it saw for the whole session."""
    total = int(status["total_rounds"] or 0)
    if st.session_state.get("rounds_seen") != total:
        st.session_state["rounds_seen"] = total
        st.session_state["rounds"] = total


def ask_reset() -> None:
    dismiss()  # a new action: the previous outcome goes
    st.session_state["confirm_reset"] = True


def cancel_reset() -> None:
    st.session_state.pop("confirm_reset", None)


def reset_confirmation(api: ServerAPI, status: dict[str, Any]) -> None:
    """Reset cannot be undone: it is done only once confirmed here."""
    def reset() -> None:
        cancel_reset()
        if keeps_runs(api):
            control(api.reset, "reset: a new run from the initial model, with the same settings (the "
                               "old one is kept: Runs tab); Start trains it")
        else:
            control(api.reset, "reset: every round is forgotten; Start trains again from the initial model")

    done = status["completed_rounds"]
    open_round = " and the round in progress" if status["round"] else ""
    with st.container(border=True):
        if keeps_runs(api):
            dropped = "; the round in progress is dropped" if open_round else ""
            st.warning(f"Reset starts a new run with the same settings, from the initial model. This "
                       f"run's {plural(done, 'completed round')} {'stays' if done == 1 else 'stay'} "
                       "readable as a past run (the "
                       f"Results tab's run picker, and Runs){dropped}. Devices stay enrolled and active.",
                       icon=":material/warning:")
        else:
            st.warning(f"Reset forgets {'all ' if done > 1 else ''}{plural(done, 'completed round')}"
                       f"{open_round}: their checkpoints, history and test results. The global model "
                       "goes back to the initial one; devices stay enrolled and active. This cannot be "
                       "undone.", icon=":material/warning:")
        yes, no, _ = st.columns([1, 1, 3])
        yes.button("Reset the run", key="reset_confirm", type="primary", on_click=reset)
        no.button("Cancel", key="reset_cancel", on_click=cancel_reset)


def privacy_text(p: dict[str, Any]) -> str:
    """What differential privacy has spent so far (``status["privacy"]``), in one line."""
    budget = f" of a budget of {p['max_epsilon']:g}" if p.get("max_epsilon") is not None else ""
    epsilon = "∞ (a round without noise)" if p["epsilon"] is None else f"{p['epsilon']:.3g}"
    return (f"Differential privacy ({p['mode']}, noise multiplier {p['noise_multiplier']:g}, clipping "
            f"bound {p['clipping_norm']:.3g}): **ε = {epsilon}** at δ = {p['delta']:g}"
            f"{budget} after {plural(p['rounds'], 'round')} (server option --dp)")


def with_settings(name: str, params: dict[str, Any] | None) -> str:
    """``scale (factor=10.0)``: a strategy's or an attack's name with its settings."""
    settings = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
    return f"{name} ({settings})" if settings else name


def declared_attack(attack: dict[str, Any] | None) -> str:
    return with_settings(attack["kind"], attack.get("params")) if attack else ""


def latest_update(latest: dict[str, Any] | None) -> str:
    """The device's part in the latest round it took part in: sent, or failed and why."""
    if not latest:
        return ""
    if latest.get("failed"):
        return f"round {latest['round']} failed: {latest.get('error') or 'ERROR logged'}"
    return f"round {latest['round']} sent"


def highlight(row: pd.Series, colours: dict[str, str], column: str) -> list[str]:
    """Styler rule: the whole row in the colour its ``column`` value calls for, if any."""
    return [colours.get(row[column], "")] * len(row)


def round_progress(progress: dict[str, int] | None) -> str:
    """A training device's batches done in the open round, as its last report said."""
    if not progress:
        return ""
    return f"{progress['done']}/{progress['total']} batches ({progress['done'] / progress['total']:.0%})"


def device_filters() -> dict[str, Any]:
    """The devices table's filters (a part of the name, lifecycle, activation), as the API takes them."""
    c1, c2, c3 = st.columns(3)
    name = c1.text_input("Name contains", key="devices_name", max_chars=64).strip()
    lifecycle = c2.selectbox("Lifecycle", [ALL, *LIFECYCLE_STATES], key="devices_lifecycle")
    activation = c3.selectbox("Activation", list(ACTIVATION), key="devices_active")
    return {"name": name or None, "lifecycle": None if lifecycle == ALL else lifecycle,
            "active": ACTIVATION[activation]}


def devices_page(api: ServerAPI, filters: dict[str, Any]) -> dict[str, Any] | None:
    """The page of matching devices the page widget names, or the last one if the filters left
    fewer pages; None once the page has said why it could not be read."""
    def page(number: int) -> dict[str, Any] | None:
        return read(lambda: api.devices_page(offset=(number - 1) * DEVICES_PER_PAGE,
                                             limit=DEVICES_PER_PAGE, **filters), "The devices")

    answer = page(int(st.session_state.get("devices_page") or 1))
    if answer is not None and not answer["devices"] and answer["total"]:
        st.session_state["devices_page"] = last = -(-answer["total"] // DEVICES_PER_PAGE)
        answer = page(last)
    return answer


def devices_panel(api: ServerAPI, status: dict[str, Any]) -> list[dict[str, Any]] | None:
    """One page of the devices that match the filters; the page's devices (None if unread)."""
    enrolled = sum(status.get("devices", {}).values())
    progress = (status.get("round") or {}).get("progress")
    st.subheader(f"Devices ({enrolled})")
    filters = device_filters()
    answer = devices_page(api, filters)
    if answer is None:
        return None
    devices, total = answer["devices"], answer["total"]
    if total > DEVICES_PER_PAGE:
        st.number_input(f"Page (of {-(-total // DEVICES_PER_PAGE)})", key="devices_page", min_value=1,
                        max_value=-(-total // DEVICES_PER_PAGE), step=1)
    if not devices:
        st.info("No device matches these filters." if enrolled else
                "No device has enrolled yet. Launch some (Local devices, above), "
                f"or run {device_command(api.server)}.")
        return devices
    st.caption(f"{plural(total, 'device')} match; rows {answer['offset'] + 1}-"
               f"{answer['offset'] + len(devices)}")
    for d in devices:
        if d["lifecycle"] == "invalid":  # names are plain (letters, digits, _ and -); the reason may not be
            st.warning(f"**{as_text(d['name'])}** is refused: {as_text(d['lifecycle_reason'])}",
                       icon=":material/block:")
    rows = [{
        "device": d["name"],
        "state": d["state"],
        "round progress": round_progress((progress or {}).get(d["name"])),
        "lifecycle": d["lifecycle"],
        "why": d["lifecycle_reason"],
        "last seen": ago(d["last_seen"]),
        "examples": d["num_examples"],
        "local accuracy": (d["latest"] or {}).get("accuracy"),
        "latest update": latest_update(d["latest"]),
        "attack (declared)": declared_attack(d.get("attack")),
    } for d in devices]
    frame = pd.DataFrame(rows).astype({"examples": "Int64"})
    # the attack column first after the name when a device declared one: never cut off at the right
    if not frame["attack (declared)"].any():
        frame = frame.drop(columns="attack (declared)")
    else:
        frame.insert(1, "attack (declared)", frame.pop("attack (declared)"))
    table(frame.style.apply(highlight, axis=1, colours=LIFECYCLE_HIGHLIGHT, column="lifecycle"),
          column_config={"local accuracy": st.column_config.NumberColumn(format="%.4f"),
                         "attack (declared)": st.column_config.TextColumn(width="medium"),
                         "why": st.column_config.TextColumn(width="large")})
    per_row = 4
    for start in range(0, len(devices), per_row):
        cols = st.columns(per_row)
        for col, d in zip(cols, devices[start:start + per_row], strict=False):
            name, active = d["name"], d["active"]
            col.button(f"{'Deactivate' if active else 'Activate'} {name}", key=f"toggle-{name}",
                       on_click=control,
                       args=(lambda n=name, a=not active: api.set_active(n, a),
                             f"{name} {'deactivated' if active else 'activated'}"))
            if d["lifecycle"] == "training":
                col.button(f"Interrupt {name}", key=f"interrupt-{name}", type="secondary",
                           help="Stop this device's local training within one batch; "
                                "the round goes on without it.",
                           on_click=control,
                           args=(lambda n=name: api.interrupt(n),
                                 f"{name} interrupted: it stops training within one batch, "
                                 "and the round goes on without it"))
    return devices


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """Long form: one row per (round, series) with accuracy and loss, the global model first."""
    rows = []
    for r in history:
        time_ = pd.to_datetime(r["closed_at"], unit="s")
        rows.append({"round": r["round"], "time": time_, "series": GLOBAL_SERIES,
                     "accuracy": r["test_accuracy"], "loss": r["test_loss"]})
        for name, m in sorted(r["devices"].items()):
            rows.append({"round": r["round"], "time": time_, "series": name,
                         "accuracy": m.get("accuracy"), "loss": m.get("loss")})
    return pd.DataFrame(rows, columns=["round", "time", "series", "accuracy", "loss"])


def x_axis(asynchronous: bool) -> alt.X:
    """Rounds; in asynchronous mode time, each point a model version (``round`` in the tooltip)."""
    if asynchronous:
        return alt.X("time:T", title="time (each point a model version)")
    return alt.X("round:Q", title="round", axis=alt.Axis(tickMinStep=1, format="d"))


def versions_chart(history: list[dict[str, Any]]) -> alt.Chart:
    """Asynchronous mode: model versions over time, with the staleness of their updates."""
    frame = pd.DataFrame([{"time": pd.to_datetime(r["closed_at"], unit="s"), "model version": r["round"],
                           "mean staleness": sum(u["staleness"] for u in r["updates"]) / len(r["updates"]),
                           "updates": r["num_updates"]} for r in history if r.get("updates")])
    return alt.Chart(frame, title="model versions over time").mark_line(
        point=True, interpolate="step-after").encode(
        x=alt.X("time:T", title="time"), y=alt.Y("model version:Q", axis=alt.Axis(format="d")),
        tooltip=["model version", "updates", alt.Tooltip("mean staleness:Q", format=".2f")])


def metric_chart(frame: pd.DataFrame, metric: str, title: str, asynchronous: bool = False) -> alt.Chart:
    is_global = alt.datum.series == GLOBAL_SERIES
    devices = sorted(set(frame["series"]) - {GLOBAL_SERIES})
    colours = alt.Scale(domain=[GLOBAL_SERIES, *devices],
                        range=[GLOBAL_COLOUR, *(DEVICE_COLOURS[i % len(DEVICE_COLOURS)]
                                                for i in range(len(devices)))])
    return alt.Chart(frame.dropna(subset=[metric]), title=title).mark_line(point=True).encode(
        x=x_axis(asynchronous),
        y=alt.Y(f"{metric}:Q", title=metric, scale=alt.Scale(zero=False)),
        color=alt.Color("series:N", title=None, scale=colours, legend=alt.Legend(orient="bottom")),
        strokeDash=alt.condition(is_global, alt.value([1, 0]), alt.value([5, 4])),
        strokeWidth=alt.condition(is_global, alt.value(3), alt.value(1.5)),
        tooltip=["round", "series", alt.Tooltip(f"{metric}:Q", format=".4f")],
    )


def charts_panel(history: list[dict[str, Any]], asynchronous: bool = False) -> None:
    st.subheader("Accuracy and loss over time, by model version" if asynchronous
                 else "Accuracy and loss over rounds")
    if not history:
        st.info("No model version has been made yet: the charts appear after version 1." if asynchronous
                else "No round has completed yet: the charts appear after round 1.")
        return
    names = sorted({name for r in history for name in r["devices"]})
    chosen = st.multiselect("Devices in the charts", names, default=names[:CHART_DEVICES],
                            key="chart_devices", help="The global model is always drawn; with many "
                            "devices, choose the few to compare with it.")
    frame = history_frame([{**r, "devices": {n: m for n, m in r["devices"].items() if n in chosen}}
                           for r in history])
    left, right = st.columns(2)
    left.altair_chart(metric_chart(frame, "accuracy",
                                   "accuracy: global on the test set, devices on their data", asynchronous),
                      width="stretch")
    right.altair_chart(metric_chart(frame, "loss", "loss: global on the test set, devices in training",
                                    asynchronous), width="stretch")
    if asynchronous:
        st.altair_chart(versions_chart(history), width="stretch")
    spent = [{"round": r["round"], "epsilon": r["privacy"]["epsilon"]} for r in history if r.get("privacy")]
    if spent:
        st.altair_chart(alt.Chart(pd.DataFrame(spent), title="privacy spent: ε after each round")
                        .mark_line(point=True, color=GLOBAL_COLOUR).encode(
                            x=alt.X("round:Q", axis=alt.Axis(tickMinStep=1, format="d")),
                            y=alt.Y("epsilon:Q", title="ε"),
                            tooltip=["round", alt.Tooltip("epsilon:Q", format=".4f")]), width="stretch")
    failed = [{"round": r["round"], "device": name, "error": m.get("error", "")}
              for r in reversed(history) for name, m in sorted(r["devices"].items()) if m.get("failed")]
    if failed:
        st.markdown(f"**Failed updates ({len(failed)})**: a device logged an ERROR for the round, "
                    "newest first")
        table(pd.DataFrame(failed).style.map(lambda _: RED))


# The per-device accuracy chart's series (:func:`fed_eval_chart`): name -> (point field, colour, dash).
FED_EVAL_BAND = "global: worst–best device"
FED_EVAL_LINES = {
    "global: mean (by examples)": ("mean", GLOBAL_COLOUR, [1, 0]),
    "global: worst 10 % of devices": ("worst_10pct", WORST_COLOUR, [5, 4]),
    "personal: mean (by examples)": ("personal_mean", PERSONAL_COLOUR, [1, 0]),
    "server: test accuracy": ("test_accuracy", SERVER_COLOUR, [2, 3]),
}


def fed_eval_chart(points: list[dict[str, Any]], asynchronous: bool = False) -> alt.LayerChart:
    """The devices' accuracy on their held-out data per round (:func:`fed_eval.accuracy_points`):
    a band from the worst device to the best, the example-weighted mean and the worst 10 % of
    devices of the global model, the personal models' mean, and the server's test accuracy."""
    frame = pd.DataFrame(points, columns=["x", *fed_eval.POINT_FIELDS])
    x_title = "model version" if asynchronous else "round"
    x = alt.X("x:Q", title=x_title, axis=alt.Axis(tickMinStep=1, format="d"))
    present = [name for name, (column, _, _) in FED_EVAL_LINES.items() if frame[column].notna().any()]
    y = alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(zero=False))
    # the band's legend above the chart (its swatch as faint as the band), the lines' below; each
    # line is told apart by its dash too, not by its colour alone
    band = frame.dropna(subset=["worst", "best"]).assign(series=FED_EVAL_BAND)
    area = alt.Chart(band).mark_area(opacity=0.18).encode(
        x=x, y=alt.Y("worst:Q", title="accuracy", scale=alt.Scale(zero=False)), y2="best:Q",
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="top", labelLimit=300),
                        scale=alt.Scale(domain=[FED_EVAL_BAND], range=[GLOBAL_COLOUR])),
        tooltip=[alt.Tooltip("x:Q", title=x_title),
                 alt.Tooltip("worst:Q", title="worst device", format=".4f"),
                 alt.Tooltip("best:Q", title="best device", format=".4f")])
    long = pd.DataFrame([{"x": row["x"], "series": name, "accuracy": row[FED_EVAL_LINES[name][0]]}
                         for row in points for name in present
                         if row[FED_EVAL_LINES[name][0]] is not None], columns=["x", "series", "accuracy"])
    lines = alt.Chart(long).mark_line(point=True).encode(
        x=x, y=y,
        color=alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=300),
                        scale=alt.Scale(domain=present, range=[FED_EVAL_LINES[n][1] for n in present])),
        strokeDash=alt.StrokeDash("series:N", legend=None, scale=alt.Scale(
            domain=present, range=[FED_EVAL_LINES[n][2] for n in present])),
        tooltip=[alt.Tooltip("x:Q", title=x_title), "series", alt.Tooltip("accuracy:Q", format=".4f")])
    return alt.layer(area, lines, title="devices' accuracy on their held-out data").resolve_scale(
        color="independent")


def fed_eval_frame(found: fed_eval.Latest) -> pd.DataFrame:
    """The per-device table of the latest report: global against personal accuracy."""
    frame = pd.DataFrame([{"device": r["device"], "held-out examples": r["num_examples"],
                           "global accuracy": r["global_accuracy"],
                           "personal accuracy": r["personal_accuracy"]} for r in found.rows],
                         columns=["device", "held-out examples", "global accuracy", "personal accuracy"])
    return frame.astype({"held-out examples": "Int64", "global accuracy": "Float64",
                         "personal accuracy": "Float64"})


def federated_eval_panel(history: list[dict[str, Any]], asynchronous: bool = False) -> None:
    """Federated evaluation: how the devices fare on their own held-out data, round by round, and
    each device of the latest round that has a report (global against personal model)."""
    st.subheader("Per-device accuracy (held-out data)")
    points = fed_eval.accuracy_points(history)
    found = fed_eval.latest(history)
    if not points and found is None:
        st.info(fed_eval.NO_DEVICE_YET)
        return
    if points:
        st.altair_chart(fed_eval_chart(points, asynchronous), width="stretch")
        st.caption(fed_eval.CAPTION)
    if found is not None:
        st.caption(fed_eval.describe(found))
        if found.rows:
            table(fed_eval_frame(found),
                  column_config={"global accuracy": st.column_config.NumberColumn(format="%.4f"),
                                 "personal accuracy": st.column_config.NumberColumn(format="%.4f")})


def efficiency_frame(history: list[dict[str, Any]], asynchronous: bool = False) -> pd.DataFrame:
    """Each round's efficiency (:func:`eff.rows`), newest first; empty cells for a round without it."""
    key = "model version" if asynchronous else "round"
    columns = [key, "images", "round time (s)", "of it, testing (s)", "one process (s)", "efficiency"]
    frame = pd.DataFrame([[r["round"], r["images"], r["round_s"], r["test_s"], r["centralized_s"], r["ratio"]]
                          for r in reversed(eff.rows(history))], columns=columns)
    return frame.astype({key: "Int64", "images": "Int64", "round time (s)": "Float64",
                         "of it, testing (s)": "Float64", "one process (s)": "Float64",
                         "efficiency": "Float64"})


def efficiency_panel(history: list[dict[str, Any]], asynchronous: bool = False) -> None:
    """With ``--efficiency``: each round's time against one process training the same images.
    Nothing at all for a run without the figure."""
    figures = eff.summarize(history)
    if figures is None:
        return
    st.subheader("Efficiency")
    st.caption(f"Latest: **{eff.tile_text(figures)}**. {eff.WHAT} The first round's time includes "
               "the devices' start-up.")
    table(efficiency_frame(history, asynchronous),
          column_config={"round time (s)": st.column_config.NumberColumn(format="%.2f"),
                         "of it, testing (s)": st.column_config.NumberColumn(format="%.2f"),
                         "one process (s)": st.column_config.NumberColumn(format="%.2f"),
                         "efficiency": st.column_config.NumberColumn(format="%.3g×")})


GREEN = "background-color: rgba(64, 192, 87, 0.22)"
OUTCOME_HIGHLIGHT = {"kept": GREEN, "clipped": AMBER}


def outcome_of(a: dict[str, Any]) -> tuple[str, str]:
    """What a strategy did with one update (its ``aggregation`` entry), and why."""
    if a.get("status") == "rejected":
        return "rejected", a.get("reason", "")
    if (a.get("trimmed_share") or 0) > 0:
        return "clipped", f"{a['trimmed_share']:.1%} of its coordinates cut"
    return "kept", ""


def screened_updates(history: list[dict[str, Any]],
                     attacks: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every update of each round where the strategy rejected or clipped one, newest round
    first: the kept ones too, since Krum keeps one update and rejects every other, honest ones
    included, and what matters is which one it kept and where the attacker went. ``attacks``:
    device -> the attack it declared, marked in the ``declared attack`` column."""
    attacks = attacks or {}
    rows = []
    for r in reversed(history):
        entries = [(name, m["aggregation"]) for name, m in sorted(r["devices"].items())
                   if m.get("aggregation")]
        outcomes = [(name, a, *outcome_of(a)) for name, a in entries]
        if all(outcome == "kept" for _, _, outcome, _ in outcomes):
            continue
        for name, a, outcome, why in outcomes:
            rows.append({"round": r["round"], "device": name, "outcome": outcome,
                         "declared attack": ATTACKER + attacks[name] if name in attacks else "",
                         "Krum score": a.get("score"), "distance to new model": a.get("distance"),
                         "why": why})
    return rows


def kept_summary(history: list[dict[str, Any]]) -> str:
    """The latest screened round in one line: which updates went into the model."""
    for r in reversed(history):
        entries = {name: outcome_of(m["aggregation"])[0] for name, m in r["devices"].items()
                   if m.get("aggregation")}
        if any(o != "kept" for o in entries.values()):
            kept = sorted(n for n, o in entries.items() if o != "rejected")
            return (f"Round {r['round']}: {plural(len(entries), 'update')} received, "
                    f"{len(kept)} used ({', '.join(kept) or 'none'}).")
    return ""


def screened_style(row: pd.Series) -> list[str]:
    """A declared attacker's row in red wherever it went; otherwise kept green, clipped amber,
    and an honest update Krum left out plain (rejecting all but one is what Krum does)."""
    colour = RED if row["declared attack"] else OUTCOME_HIGHLIGHT.get(row["outcome"], "")
    return [colour] * len(row)


def aggregation_panel(status: dict[str, Any], history: list[dict[str, Any]],
                      failures: list[dict[str, Any]], devices: list[dict[str, Any]]) -> None:
    """What a robust strategy kept, rejected or clipped, round by round, and failed rounds;
    ``devices``: the enrolled devices, whose declared attacks are marked."""
    strategy = status.get("strategy") or {}
    st.subheader("Kept, rejected or clipped updates")
    st.caption(f"What {as_text(strategy.get('name', 'the strategy'))} did with each update, in the "
               "rounds where it left some out or cut them: **kept** updates went into the new global "
               "model; **rejected** ones were left out (Krum keeps the one update closest to the "
               "others and rejects the rest, honest ones included; Multi-Krum and Bulyan keep a few); "
               "**clipped** ones had part of their coordinates cut (trimmed mean, Bulyan). Red rows "
               f"are devices that declared an attack ({ATTACKER.strip()}): an attacker's Krum score "
               "and distance to the new model are far larger than the others'.")
    attacks = {d["name"]: declared_attack(d["attack"]) for d in devices if d.get("attack")}
    rows = screened_updates(history, attacks)
    if rows:
        st.markdown(kept_summary(history))
        frame = pd.DataFrame(rows)
        table(frame.style.apply(screened_style, axis=1),
              column_config={"Krum score": st.column_config.NumberColumn(format="%.4g"),
                             "distance to new model": st.column_config.NumberColumn(format="%.4g"),
                             "why": st.column_config.TextColumn(width="large")})
    elif history:
        st.info("Every update so far was used in full.")
    if failures:
        st.markdown(f"**Failed rounds ({len(failures)})**: no global model came out of these "
                    "attempts; each round ran again. Newest first.")
        table(pd.DataFrame([{"round": f["round"], "failed": ago(f["failed_at"]), "why": f["reason"]}
                            for f in reversed(failures)]).style.map(lambda _: RED),
              column_config={"why": st.column_config.TextColumn(width="large")})


def compression_text(compression: dict[str, Any] | None) -> str:
    """``q4, the download compressed too``: how updates travel (status ``compression``)."""
    if not compression or compression.get("uplink", "none") == "none":
        return "uncompressed"
    down = ", the download compressed too" if compression.get("downlink") else ""
    return f"{compression['uplink']}{down}"


def secure_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each round's secure aggregation, newest first: who was summed, who was recovered."""
    rows = []
    for entry in reversed(history):
        s = entry.get("secagg")
        if s:
            rows.append({"round": entry["round"], "masked updates summed": s["survivors"],
                         "threshold": s["threshold"], "dropouts recovered": len(s["recovered"]),
                         "recovered devices": ", ".join(s["recovered"]) or BLANK,
                         "refused": ", ".join(s.get("refused", [])) or BLANK})
    return rows


def secure_panel(status: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Whether the server sees each update or only their sum, and how each round's went."""
    st.subheader("Secure aggregation")
    settings = status.get("secure_aggregation")
    if not settings:
        st.caption("**Off**: the server sees each device's update (server option --secure-aggregation "
                   "masks them, so that it learns only their weighted mean).")
        return
    threshold = settings["threshold"] or "a strict majority of the"
    st.caption(f"**On** (SecAgg+): the server learns only the weighted mean of each round's updates. "
               f"Each device's masks are shared among {settings['shares']} devices, {threshold} of "
               f"which rebuild them if it drops out; coordinates clipped to ±{settings['clip_range']:g}.")
    current = (status.get("round") or {}).get("secagg")
    if current:
        st.caption(f"Round {status['round']['number']}: stage **{current['stage']}**, waiting for "
                   f"{plural(len(current['expected']), 'device')}.")
    rows = secure_rows(history)
    if rows:
        table(pd.DataFrame(rows))


def log_time(epoch_seconds: float) -> str:
    """A log line's time (the device's clock) in this machine's time zone, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_seconds))


def tail_logs(api: ServerAPI, **filters: Any) -> tuple[list[dict[str, Any]], bool]:
    """The latest ``LOG_ROWS`` lines for these filters, and whether the server has more to send.

    The server pages oldest first (``after`` = the last id seen, answered with ``next_after``)
    and has no "newest first", so the session keeps a cursor for the current filters and each
    refresh reads only the lines after it (a long log is caught up with over a few refreshes).
    """
    key = repr((api.server, sorted(filters.items())))
    tail = st.session_state.get("log_tail")
    if not tail or tail["key"] != key:  # new filters: read from the start again
        tail = {"key": key, "after": 0, "lines": []}
    behind = True
    for _ in range(LOG_PAGES_PER_REFRESH):
        page = api.logs(after=tail["after"], limit=LOG_PAGE, **filters)
        tail["lines"] = (tail["lines"] + page["logs"])[-LOG_ROWS:]
        tail["after"] = page["next_after"]
        if len(page["logs"]) < LOG_PAGE:
            behind = False
            break
    st.session_state["log_tail"] = tail
    return tail["lines"], behind


def logs_panel(api: ServerAPI, devices: list[dict[str, Any]]) -> None:
    """``devices``: those on the devices table's page, to choose from."""
    st.subheader("Device logs")
    if not api.admin_token:
        st.info("Device logs need the admin token (sidebar): their messages are free text from the "
                "devices. The other views work without it.")
        return
    c1, c2, c3 = st.columns(3)
    device = c1.selectbox("Device", [ALL, *(d["name"] for d in devices)], key="log_device")
    level = c2.selectbox("Level", [ALL, *LOG_LEVELS], key="log_level")
    round_number = c3.number_input("Round", key="log_round", min_value=0, value=None, step=1,
                                   placeholder=ALL)
    tail = read(lambda: tail_logs(api, device=None if device == ALL else device,
                                  level=None if level == ALL else level,
                                  round_number=None if round_number is None else int(round_number)),
                "The logs")
    if tail is None:
        return
    lines, behind = tail
    if not lines:
        st.info("No log line yet." if (device, level, round_number) == (ALL, ALL, None)
                else "No log line matches these filters.")
        return
    # newest first by the devices' clocks: a device sends its lines in batches, so arrival order
    # (the ids) interleaves devices by up to a second
    newest_first = sorted(lines, key=lambda e: (e["time"], e["id"]), reverse=True)
    frame = pd.DataFrame([{"time": log_time(e["time"]), "device": e["device"], "level": e["level"],
                           "round": e["round"], "message": e["message"]} for e in newest_first])
    frame["round"] = frame["round"].astype("Int64")
    table(frame.style.apply(highlight, axis=1, colours=LEVEL_HIGHLIGHT, column="level"),
          column_config={"message": st.column_config.TextColumn(width="large")})
    st.caption(f"The latest {plural(len(lines), 'line')}, newest first"
               + (" read so far (more are still coming from the server)" if behind else "")
               + ". An ERROR that names a round marks that device's update for the round failed.")


Snapshot = tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]


def snapshot(api: ServerAPI, retry_key: str) -> Snapshot | None:
    """The run's status, its completed rounds and its failed ones; None once the page has said
    why they could not be read (a banner with a Retry button keyed ``retry_key``)."""
    try:
        status = api.status()
        history, failures = api.history_and_failures()
    except NO_SERVER as exc:
        server_down_banner(api, exc, key=retry_key)
    except ServerError as exc:
        st.error(refusal(exc))
    except Exception as exc:  # a live re-run happens outside main()'s guard
        unexpected(exc)
    else:
        return status, history, failures
    return None


def run_view(api: ServerAPI) -> None:
    """The Run tab's live part, in the order of a first run: start the training, then the
    devices (activate, interrupt). Re-run every few seconds when live refresh is on."""
    read_now = snapshot(api, "retry")
    if read_now is None:
        show_flash()
        return
    status, history, _ = read_now
    try:
        show_flash(status=status["status"])
        training_panel(api, status, history)
        devices_panel(api, status)
    except Exception as exc:
        unexpected(exc)


def results_view(api: ServerAPI) -> None:
    """The Results tab's live part: the run to show (the current one, live, or a past one),
    its accuracy and loss over rounds, the latest model on the test set, and a model to download.
    Every panel here follows the run: each refresh draws them from one reading of the server."""
    chosen = run_picker(read_runs(api))
    if chosen is not None:
        try:
            past_run_view(api, chosen)
        except Exception as exc:
            unexpected(exc)
        return
    read_now = snapshot(api, "retry_results")
    if read_now is None:
        return
    status, history, _ = read_now
    try:
        charts_panel(history, status.get("mode") == "async")
        federated_eval_panel(history, status.get("mode") == "async")
        efficiency_panel(history, status.get("mode") == "async")
        model_panel(api, history)
        download_panel(api, history)
    except Exception as exc:
        unexpected(exc)


# --------------------------------------------------------------------------- runs

CURRENT_RUN = "current"  # the run picker's choice of the current run, live


def read_runs(api: ServerAPI) -> list[dict[str, Any]] | None:
    """The server's runs, newest first; None from a server without runs (``GET /api/runs``
    404), or when it cannot be read now (the live part beside it says why)."""
    try:
        return api.runs()
    except (*NO_SERVER, ServerError):
        return None


def keeps_runs(api: ServerAPI) -> bool:
    """Whether the server keeps past runs (a Reset then starts a new one, the old one kept)."""
    return read_runs(api) is not None


def run_picker(runs: list[dict[str, Any]] | None) -> int | None:
    """Which run the Results tab shows: None for the current run (live), else a past run's id.
    Past runs are read-only; a server without runs has only the current one (no picker)."""
    if not runs:
        return None
    past = {r["id"]: r for r in runs if not r.get("current")}
    if st.session_state.get("results_run") not in (CURRENT_RUN, *past):
        st.session_state["results_run"] = CURRENT_RUN  # that run is gone (deleted)
    choice = st.selectbox("Run", [CURRENT_RUN, *past], key="results_run",
                          format_func=lambda r: "the current run (live)" if r == CURRENT_RUN
                          else run_settings.run_label(past[r]),
                          help="The current run refreshes live; a past run is shown as it ended.")
    return None if choice == CURRENT_RUN else int(choice)


def run_detail(api: ServerAPI, run_id: int) -> dict[str, Any]:
    """``GET /api/runs/<id>``; a finished run's answer is kept for the session (it cannot change),
    a running one's is read again on each refresh."""
    kept = st.session_state.setdefault("run_details", {})
    key = f"{api.server} {run_id}"
    if key in kept:
        return kept[key]
    run = api.run(run_id)
    if run.get("status") == "finished" and not run.get("current"):
        kept[key] = run
    return run


def past_run_view(api: ServerAPI, run_id: int) -> None:
    """A past run, read-only: what it was, its settings, its curves (models and downloads are the
    current run's; the server serves those by round of the current run)."""
    run = read(lambda: run_detail(api, run_id), "The run")
    if run is None:
        return
    finished = ago(run.get("finished_at")) if run.get("finished_at") else "not finished"
    st.info(f"**{as_text(run_settings.run_label(run))}**: {run['completed_rounds']} of "
            f"{run['total_rounds'] or '∞'} rounds, created {ago(run.get('created_at'))}, finished "
            f"{finished}. A past run is read-only; choose the current run to follow training.",
            icon=":material/history:")
    charts_panel(run.get("history") or [], run.get("settings", {}).get("mode") == "async")
    federated_eval_panel(run.get("history") or [], run.get("settings", {}).get("mode") == "async")
    efficiency_panel(run.get("history") or [], run.get("settings", {}).get("mode") == "async")
    with st.expander("Its settings"):
        table(run_settings.settings_table([run]).drop(columns="differs"))


def compare_chart(frame: pd.DataFrame, metric: str, title: str) -> alt.Chart:
    """One chart for every chosen run: the global model's ``metric`` per round, a colour per run."""
    return alt.Chart(frame.dropna(subset=[metric]), title=title).mark_line(point=True).encode(
        x=alt.X("round:Q", title="round", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y(f"{metric}:Q", title=metric, scale=alt.Scale(zero=False)),
        color=alt.Color("run:N", title="run", legend=alt.Legend(orient="bottom", labelLimit=400),
                        scale=alt.Scale(range=[GLOBAL_COLOUR, *DEVICE_COLOURS])),
        tooltip=["run", "round", alt.Tooltip(f"{metric}:Q", format=".4f")])


def differs_style(row: pd.Series) -> list[str]:
    """A setting the runs disagree on stands out, the whole row."""
    return [AMBER if row["differs"] == run_settings.DIFFERS else ""] * len(row)


def compare_view(api: ServerAPI) -> None:
    """Compare runs: the chosen runs' test accuracy and loss per round on one chart each (a colour
    per run), and their settings side by side with the differing ones marked. Live: the current
    run's curve grows as it trains."""
    st.subheader("Compare runs")
    runs = read_runs(api)
    if runs is None:
        st.info("This server keeps no past runs (no GET /api/runs): only the current run is shown.")
        return
    if len(runs) < 2:
        st.info("One run so far: start another (New run, below, or Reset on the Run tab) to compare.")
    by_id = {r["id"]: r for r in runs}
    chosen = st.multiselect("Runs to compare", list(by_id), default=list(by_id)[:2], key="compare_runs",
                            format_func=lambda i: run_settings.run_label(by_id[i]) if i in by_id else f"#{i}")
    details = []
    for run_id in chosen:
        if run_id in by_id:
            detail = read(lambda i=run_id: run_detail(api, i), f"Run #{run_id}")
            if detail is not None:
                details.append(detail)
    if not details:
        return
    frame = run_settings.curves_frame(details)
    if frame.empty:
        st.info("None of these runs has completed a round yet: the curves appear after round 1.")
    else:
        left, right = st.columns(2)
        left.altair_chart(compare_chart(frame, "accuracy", "test accuracy per round, by run"),
                          width="stretch")
        right.altair_chart(compare_chart(frame, "loss", "test loss per round, by run"), width="stretch")
    if run_settings.any_evaluated(details):
        st.markdown("**Latest accuracy**: the server's test accuracy of each run's last model, and "
                    "from its latest federated evaluation the devices' accuracy on their held-out data")
        table(run_settings.evaluation_table(details),
              column_config={c: st.column_config.NumberColumn(format="%.4f")
                             for c in run_settings.EVALUATION_COLUMNS[2:]})
    settings = run_settings.settings_table(details)
    differ = run_settings.differing(settings)
    st.markdown(f"**Settings**: {run_settings.DIFFERS} marks what differs "
                + (f"({as_text(', '.join(differ))})" if differ else "(nothing)"))
    if st.toggle("Only the settings that differ", key="compare_only_differing", value=False):
        settings = settings[settings["differs"] == run_settings.DIFFERS]
    # a static table (few rows), so that what differs reads at a glance and prints as it shows
    st.table(settings.set_index("setting").style.apply(differs_style, axis=1))


def number_text(value: Any) -> str:
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def parse_param(spec: dict[str, Any], text: str) -> Any:
    """A strategy parameter as typed into the form, as its declared type (empty: its default).
    ValueError naming the parameter for text that is not one."""
    text = text.strip()
    if not text:
        return None
    kind = spec["type"]
    try:
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("bool"):
            return text.lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ValueError(f"{spec['name']} must be {kind}, got {text!r}") from None
    return text


def form_defaults(runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """What the New run form starts with: the current run's settings, else the engine's defaults
    (:func:`fedhub.dashboard.runs.engine_defaults`, the one place they come from)."""
    defaults = dataclasses.asdict(run_settings.engine_defaults())
    current = next((r for r in runs or [] if r.get("current")), None)
    settings = dict((current or {}).get("settings") or {})
    settings.update(settings.pop("training", None) or {})  # nested or flat, as the server keeps them
    out = {**defaults, **{k: v for k, v in settings.items() if k in defaults and v is not None}}
    out["strategy_params"] = settings.get("strategy_params") or {}
    out["dp_on"] = bool(settings.get("dp"))
    out["dp"] = {**defaults["dp"], **(settings.get("dp") or {})}
    return out


def seed_form(defaults: dict[str, Any]) -> None:
    """Fill the form's widgets once per session (afterwards they keep what the person typed)."""
    if st.session_state.get("new_run_seeded"):
        return
    st.session_state["new_run_seeded"] = True
    state = st.session_state
    state["new_strategy"] = defaults["strategy"]
    for key in ("rounds", "epochs", "batch_size"):
        state[f"new_{key}"] = int(defaults[key])
    for key in ("learning_rate", "fraction", "quorum", "round_timeout"):
        state[f"new_{key}"] = float(defaults[key])
    state["new_compression"] = defaults["compression"]
    state["new_dp_mode"] = defaults["dp"]["mode"] if defaults["dp_on"] else run_settings.NO_DP
    for key in ("noise_multiplier", "clipping_norm", "delta"):
        state[f"new_dp_{key}"] = float(defaults["dp"][key])
    state["new_dp_max_epsilon"] = number_text(defaults["dp"].get("max_epsilon"))
    for name, value in defaults["strategy_params"].items():
        state[f"new_param_{defaults['strategy']}_{name}"] = number_text(value)


def new_run_panel(api: ServerAPI) -> None:
    """Start a new run with chosen settings (``POST /api/runs``); the current run is kept."""
    st.subheader("New run")
    if not api.admin_token:
        st.info("Starting a run needs the admin token (sidebar).")
        return
    runs = read_runs(api)
    if runs is None:
        st.info("This server cannot start runs (no POST /api/runs): restart it with other options.")
        return
    seed_form(form_defaults(runs))
    st.caption("The form starts as a copy of the current run's settings; the server checks them "
               "and names a setting it refuses. Devices enrolled now train in the new run.")
    c1, c2 = st.columns([1, 2])
    name = c1.text_input("Name (optional)", key="new_name", max_chars=100)
    strategy = c2.selectbox("Strategy", run_settings.strategy_names(), key="new_strategy")
    specs = run_settings.strategy_params(strategy)
    if specs:
        cols = st.columns(len(specs))
        for col, spec in zip(cols, specs, strict=True):
            col.text_input(spec["name"], key=f"new_param_{strategy}_{spec['name']}",
                           placeholder=f"default {number_text(spec['default']) or 'none'}", help=spec["help"])
    c = st.columns(4)
    c[0].number_input("Rounds (0: until paused)", key="new_rounds", min_value=0, max_value=10_000_000, step=1)
    c[1].number_input("Local epochs", key="new_epochs", min_value=1, max_value=10_000, step=1)
    c[2].number_input("Batch size", key="new_batch_size", min_value=1, max_value=1_000_000, step=1)
    c[3].number_input("Learning rate", key="new_learning_rate", min_value=0.0, max_value=10.0,
                      format="%g", step=1e-4)
    c = st.columns(4)
    c[0].number_input("Fraction of devices a round", key="new_fraction", min_value=0.0, max_value=1.0,
                      step=0.1, format="%g")
    c[1].number_input("Quorum", key="new_quorum", min_value=0.0, max_value=1.0, step=0.1, format="%g")
    c[2].number_input("Round timeout (s)", key="new_round_timeout", min_value=1.0, step=10.0, format="%g")
    c[3].text_input("Compression", key="new_compression",
                    help="none, q8, q4 (8/4-bit deltas) or topk:FRACTION (sparse, with error feedback)")
    c = st.columns(5)
    mode = c[0].selectbox("Differential privacy", [run_settings.NO_DP, *run_settings.dp_modes()],
                          key="new_dp_mode")
    if mode != run_settings.NO_DP:
        c[1].number_input("Noise multiplier", key="new_dp_noise_multiplier", min_value=0.0, format="%g")
        c[2].number_input("Clipping bound", key="new_dp_clipping_norm", min_value=0.0, format="%g")
        c[3].number_input("δ", key="new_dp_delta", min_value=0.0, max_value=0.5, format="%g")
        c[4].text_input("Budget ε (optional)", key="new_dp_max_epsilon")

    def start() -> None:
        state = st.session_state
        try:
            params = {spec["name"]: parse_param(spec, state.get(f"new_param_{strategy}_{spec['name']}", ""))
                      for spec in specs}
            dp = None
            if state["new_dp_mode"] != run_settings.NO_DP:
                budget = parse_param({"name": "budget ε", "type": "float"},
                                     state.get("new_dp_max_epsilon", ""))
                dp = {"mode": state["new_dp_mode"], "noise_multiplier": state["new_dp_noise_multiplier"],
                      "clipping_norm": state["new_dp_clipping_norm"], "delta": state["new_dp_delta"],
                      "max_epsilon": budget}
            settings = run_settings.new_run_settings(
                strategy=state["new_strategy"], params=params, rounds=state["new_rounds"],
                epochs=state["new_epochs"], batch_size=state["new_batch_size"],
                learning_rate=state["new_learning_rate"], fraction=state["new_fraction"],
                quorum=state["new_quorum"], round_timeout=state["new_round_timeout"],
                compression=state["new_compression"], dp=dp)
        except ValueError as exc:
            flash("error", f"Not started: {exc}", "new_run")
            return
        try:
            answer = api.new_run(settings, name.strip() or None)
            if state.get("new_start", True):
                answer.update(api.start())
        except NO_SERVER as exc:
            flash("error", f"The server cannot be reached: {exc}", "new_run")
        except ServerError as exc:  # a refused setting: the server names it
            flash("error", refusal(exc), "new_run")
        else:
            flash("success", f"new run #{answer.get('id', '?')} ({settings['strategy']}): "
                             f"{answer.get('status', '?')}; compare it with the others above", "new_run")

    st.checkbox("Start training at once", key="new_start", value=True,
                help="Else the new run waits, idle, for Start on the Run tab.")
    st.button("Start the new run", key="new_run", type="primary", on_click=start,
              help="POST /api/runs: the current run is kept, and can be compared with the new one.")
    show_flash("new_run")


def runs_view(api: ServerAPI) -> None:
    """The Runs tab's live part: the runs compared (the current one's curve grows as it trains)."""
    try:
        compare_view(api)
    except Exception as exc:
        unexpected(exc)


def details_view(api: ServerAPI) -> None:
    """The Robustness and logs tab's live part: what the strategy did with each update, secure
    aggregation, the devices' logs."""
    read_now = snapshot(api, "retry_details")
    if read_now is None:
        return
    status, history, failures = read_now
    try:
        devices = read(api.devices, "The devices") or []
        aggregation_panel(status, history, failures, devices)
        secure_panel(status, history)
        logs_panel(api, devices)
    except Exception as exc:
        unexpected(exc)


@st.cache_resource
def local_devices() -> LocalDevices:
    """One registry per Streamlit server, shared by every tab, kept across reruns."""
    return LocalDevices()


def launcher_panel(api: ServerAPI) -> None:
    st.subheader("Local devices (demo)")
    st.caption("Devices that train on this machine, on the folders `python -m fedhub.split` "
               "made. Devices on other machines join with "
               f"{device_command(api.server)}.")
    local = local_devices()
    c1, c2, c3 = st.columns([1, 3, 3])
    count = int(c1.number_input("How many", key="launch_count", min_value=1, max_value=1000, value=3))
    workers = int(c1.number_input("Worker processes", key="launch_workers", min_value=1,
                                  max_value=64, value=min(2, os.cpu_count() or 1),
                                  help="The devices run as virtual devices on this many processes "
                                       "(python -m fedhub.device.launcher --workers): one model each"))
    folders = state_folders()
    default_root = os.environ.get("FEDHUB_DEVICES_ROOT") or str(folders.devices_root)
    devices_root = Path(c2.text_input("Data folder (from python -m fedhub.split)",
                                      key="devices_root", value=default_root))
    state_dir = Path(c3.text_input("Server state folder (its enroll.secret, unless "
                                   "FEDHUB_ENROLL_SECRET is set)", key="state_dir",
                                   value=str(folders.server_dir)))
    auto = st.checkbox("Devices start active", key="launch_auto", value=True)
    missing = missing_data(devices_root, device_names(count))
    if missing:
        st.warning(f"No training data for {', '.join(missing)} in {devices_root}. Split Fashion-MNIST "
                   f"first: `python -m fedhub.split --devices {count}`.")

    def launch() -> None:
        try:
            started = local.launch(api.server, count, workers=workers, devices_root=devices_root,
                                   state_dir=state_dir, auto_activate=auto)
        except (ValueError, OSError) as exc:
            flash("error", f"Not launched: {exc}", "launcher")
        else:
            flash("success", f"started {', '.join(started)}" if started else "all of them already run",
                  "launcher")

    def stop() -> None:
        stopped = local.stop_all()
        flash("success", f"stopped {', '.join(stopped)}" if stopped else "none was running", "launcher")

    b1, b2, _ = st.columns([1, 1, 4])
    b1.button(f"Launch {count}", key="launch", type="primary", disabled=bool(missing), on_click=launch)
    b2.button("Stop all", key="stop_local", disabled=not local.running(), on_click=stop)
    show_flash("launcher")
    rows = local.rows()
    if rows:
        table(pd.DataFrame(rows))


def evaluation_of(api: ServerAPI, latest: dict[str, Any]) -> dict[str, Any]:
    """The server's test-set evaluation of the round in ``latest`` (a history entry), asked
    once per round: the key names the round's model for good (numbers repeat after a reset)."""
    key = (api.server, latest["round"], latest["closed_at"])
    kept = st.session_state.get("evaluation")
    if not kept or kept[0] != key:
        kept = (key, api.evaluation(latest["round"]))
        st.session_state["evaluation"] = kept
    return kept[1]


def class_bars(names: list[str], values: list[float | None], value: str, title: str,
               marked: str | None = None) -> alt.Chart:
    """One horizontal bar from 0 to 1 per class, in label order; the ``marked`` class stands out."""
    frame = pd.DataFrame({"class": names, value: values})
    frame["marked"] = frame["class"] == marked
    return alt.Chart(frame, title=title).mark_bar().encode(
        x=alt.X(f"{value}:Q", scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("class:N", sort=list(names), title=None),
        color=alt.condition(alt.datum.marked, alt.value(GLOBAL_COLOUR), alt.value("#adb5bd")),
        tooltip=["class", alt.Tooltip(f"{value}:Q", format=".4f")],
    ).properties(height=alt.Step(24))  # a fixed pixel height drops every other class label


def confusion_chart(answer: dict[str, Any], names: list[str]) -> alt.Chart:
    """Rows: the true class; columns: the predicted one; shade: the share of the row."""
    cells = [{"true": names[i], "predicted": names[j], "count": count, "share": count / max(1, sum(row))}
             for i, row in enumerate(answer["confusion_matrix"]) for j, count in enumerate(row)]
    base = alt.Chart(pd.DataFrame(cells)).encode(
        x=alt.X("predicted:N", sort=names, title="predicted class",
                axis=alt.Axis(labelAngle=-45, labelOverlap=False)),
        y=alt.Y("true:N", sort=names, title="true class"),
        tooltip=["true", "predicted", "count", alt.Tooltip("share:Q", format=".1%")])
    squares = base.mark_rect().encode(
        color=alt.Color("share:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]), legend=None))
    counts = base.mark_text(fontSize=11).encode(
        text="count:Q", color=alt.condition(alt.datum.share > 0.5, alt.value("white"), alt.value("black")))
    return (squares + counts).properties(title="confusion matrix (rows: true class)", height=alt.Step(28))


def model_panel(api: ServerAPI, history: list[dict[str, Any]]) -> None:
    """The latest global model on the server's test set: confusion matrix and per-class accuracy."""
    st.subheader("Latest global model on the test set")
    if not history:
        st.info("No round has completed yet: the confusion matrix appears after round 1.")
        return
    if not api.admin_token:
        st.info("The confusion matrix needs the admin token (sidebar).")
        return
    answer = read(lambda: evaluation_of(api, history[-1]), "The test results")
    if answer is None:
        return
    names = answer.get("class_names") or [str(i) for i in range(len(answer["confusion_matrix"]))]
    st.caption(f"Round {answer['round']}'s global model on {plural(answer['num_examples'], 'test image')}: "
               f"accuracy {answer['accuracy']:.4f}. Each row is one true class: where its images went.")
    left, right = st.columns([3, 2])
    left.altair_chart(confusion_chart(answer, names), width="stretch")
    right.altair_chart(class_bars(names, answer["per_class_accuracy"], "accuracy",
                                  "accuracy on each class"), width="stretch")


# The run's network as a server from before GET /api/status's ``network`` implies it.
FASHION_NETWORK: dict[str, Any] = {"framework": "keras", "dataset": "fashion-mnist", "class_names": None,
                                   "image_shape": [28, 28], "export_suffix": ".keras"}
DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "cifar-10": "CIFAR-10"}


def run_network(api: ServerAPI) -> dict[str, Any]:
    """What the server says of its network (``GET /api/status``'s ``network``): the export's
    file suffix, the data set, its class names and picture shape. The pages below name files
    and describe pictures from it, never from what FedHub trained first (Keras, Fashion-MNIST).
    A server that is down or says nothing gives Fashion-MNIST's Keras defaults."""
    try:
        network = api.status().get("network")
    except (*NO_SERVER, ServerError):
        network = None
    if not isinstance(network, dict):
        return FASHION_NETWORK
    return {**FASHION_NETWORK, **{k: v for k, v in network.items() if v is not None}}


def export_caption(network: dict[str, Any]) -> str:
    """What the downloaded file is, and how the plain framework opens it."""
    if network["export_suffix"] == ".pt2":
        return ("A `torch.export` program (`.pt2`) that plain PyTorch runs: `torch.export.load(f)"
                ".module()` takes raw uint8 images and gives class probabilities")
    return "A `.keras` file that plain `keras.saving.load_model` opens"


def download_panel(api: ServerAPI, history: list[dict[str, Any]]) -> None:
    """The global model of a completed round of the current run as the file its framework
    exports (``.keras``, or ``.pt2`` for PyTorch, as the server's status names it), fetched only
    on the click. ``history``: the rounds the Results tab's live part has just read, so that a
    round completing shows here at once (outside that part, this panel was drawn only on a page
    reload, and said "nothing to download" after training)."""
    st.subheader("Download a model")
    done = [r["round"] for r in reversed(history)]
    if not done:
        st.info("No round has completed yet: nothing to download.")
        return
    network = run_network(api)
    c1, c2, _ = st.columns([2, 2, 3], vertical_alignment="bottom")
    chosen = c1.selectbox("Round to download", done, key="download_round",
                          format_func=lambda n: f"round {n}{' (latest)' if n == done[0] else ''}")
    c2.download_button(f"Download round {chosen}", key="download_model", icon=":material/download:",
                       data=lambda: api.model_file(chosen),
                       file_name=f"fedhub_round_{chosen:05d}{network['export_suffix']}",
                       mime="application/octet-stream", on_click="ignore", disabled=not api.admin_token)
    st.caption(f"{export_caption(network)} (`GET /api/rounds/N/model.keras`"
               + (")." if api.admin_token else "; it needs the admin token, sidebar)."))


def probability_chart(answer: dict[str, Any]) -> alt.Chart:
    return class_bars(answer["class_names"], answer["probabilities"], "probability",
                      "probability of each class", marked=answer["class_name"])


# What each data set's pictures look like, for the advice on a prediction the model is unsure of.
LOOKS_LIKE = {
    "fashion-mnist": "The model learned from Fashion-MNIST (one light item, centred, on black): a photo "
                     "of one item, filling the frame on a plain background, gives it a fair chance.",
    "cifar-10": "The model learned from CIFAR-10 (small colour photos, the object whole and roughly "
                "centred in its scene): a photo of one of its classes, the object filling most of "
                "a square frame, gives it a fair chance.",
}


def show_prediction(api: ServerAPI, name: str, data: bytes, mime: str | None,
                    network: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The upload handler: ask the server, then show the picture, the class and the probabilities.

    The picture is shown only once the server has decoded it, so a file that is not an
    image gets the server's explanation rather than a decoding error here.
    """
    try:
        answer = api.predict([(name, data, mime or "application/octet-stream")])[0]
    except NO_SERVER as exc:
        server_down_banner(api, exc, key="retry_predict")
        return None
    except ServerError as exc:
        st.error(refusal(exc))
        return None
    network = network or FASHION_NETWORK
    left, middle, right = st.columns([1, 1, 3])
    left.image(data, caption=name, width="stretch")
    seen = model_input(answer)
    if seen is not None:
        side = f"{seen.width // MODEL_INPUT_ZOOM}x{seen.height // MODEL_INPUT_ZOOM}"
        middle.image(seen, caption=f"what the model saw ({side})", width="stretch")
    confidence = answer["probabilities"][answer["class_index"]]
    by = f"by the global model of round {answer['round']}"
    if confidence >= SURE:
        right.success(f"Predicted: **{answer['class_name']}** ({confidence:.1%}), {by}")
    else:
        advice = LOOKS_LIKE.get(network["dataset"], "")
        right.warning(f"Not sure: perhaps **{answer['class_name']}**, but only {confidence:.1%}, {by}. "
                      f"{advice}", icon=":material/help:")
    right.altair_chart(probability_chart(answer), width="stretch")
    return answer


def model_input(answer: dict[str, Any]) -> Image.Image | None:
    """The picture the server classified (``input_png``: 28x28 grey, or 32x32 colour for
    CIFAR-10), enlarged ``MODEL_INPUT_ZOOM`` times with sharp pixels, so a person sees what the
    crop (and for grey pictures the background) made of the photo; None from an older server."""
    encoded = answer.get("input_png")
    if not encoded:
        return None
    try:
        picture = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        picture.load()
    except (ValueError, OSError):
        return None
    return picture.resize((picture.width * MODEL_INPUT_ZOOM, picture.height * MODEL_INPUT_ZOOM),
                          Image.Resampling.NEAREST)


def predict_panel(api: ServerAPI) -> None:
    st.subheader("Predict")
    network = run_network(api)
    shape = network["image_shape"]
    side = f"{shape[0]}x{shape[1]}"
    if len(shape) == 3:  # colour: CIFAR-10
        made = f"cropped to the centre square and scaled to {side}, in colour"
        what = "A colour picture"
    else:
        made = f"greyscale, cropped to the item, the background made black and the item bright, {side}"
        what = "A picture of a garment"
    st.caption("The picture goes to the server's POST /api/predict, which classifies it with the "
               f"latest global model after making it look like the training data: {made}. The page "
               f"shows that {side} picture beside yours.")
    if network["class_names"]:
        st.caption(f"Classes ({DATASET_TITLES.get(network['dataset'], network['dataset'])}): "
                   + ", ".join(network["class_names"]) + ".")
    picture = st.file_uploader(f"{what} (PNG, JPEG, BMP, GIF or WebP)",
                               type=PICTURE_TYPES, key="picture", max_upload_size=MAX_PICTURE_MB,
                               help=f"The server takes up to {MAX_PICTURE_MB} MiB per request "
                                    "(server.py --max-image-mb).")
    if picture is not None:
        show_prediction(api, picture.name, picture.getvalue(), picture.type, network)


TABS = ("Run", "Results", "Runs", "Predict", "Robustness and logs")


def main() -> None:
    """The page, in tabs ordered by what a user does first: Run (launch devices, start, the
    devices), Results (charts, the model on the test set, download: the current run's or a past
    one's), Runs (compare runs, start a new one), Predict, and the details (robust aggregation,
    secure aggregation, logs). Each tab's live part refreshes on its own."""
    st.set_page_config(page_title="FedHub dashboard", page_icon=":material/hub:", layout="wide")
    title = st.empty()  # first on the page; its data set is the server's, known once connected
    api, live = sidebar()
    dataset = run_network(api)["dataset"]
    title.title(f"FedHub · federated {DATASET_TITLES.get(dataset, dataset)}")
    every = REFRESH_SECONDS if live else None
    try:
        run, results, runs, predict, details = st.tabs(TABS, key="view")
        with run:
            st.caption("A first run: **1.** launch devices, **2.** Start; then watch the "
                       "**Results** tab, and try the model in **Predict**.")
            launcher_panel(api)
            st.fragment(run_every=every)(run_view)(api)
        with results:
            st.fragment(run_every=every)(results_view)(api)
        with runs:
            st.fragment(run_every=every)(runs_view)(api)
            new_run_panel(api)
        with predict:
            predict_panel(api)
        with details:
            st.fragment(run_every=every)(details_view)(api)
    except Exception as exc:  # the page must stay usable: say what happened, log the details
        unexpected(exc)


if __name__ == "__main__":  # `streamlit run` and AppTest; importing the module draws nothing
    main()
