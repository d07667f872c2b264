"""One round lifecycle: the coordinator is a façade over one round policy (synchronous rounds
or buffered asynchronous versions), with one upload intake, one driver thread and one
failure path for an upload that was folded in but could not be recorded."""

from __future__ import annotations

import ast
import threading

import pytest

from fedhub.checkout import ROOT
from fedhub.engine.async_rounds import AsyncRounds
from fedhub.engine.sync_rounds import SyncRounds
from tests.conftest import wait_until
from tests.test_api import bearer, make_app, register, update_body, upload, wait_task


def test_the_coordinator_never_asks_which_mode_it_is_in():
    """Every mode's difference lives in its policy: the coordinator's only mention of a mode is
    the table that picks the policy."""
    tree = ast.parse((ROOT / "fedhub/engine/rounds.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If | ast.IfExp | ast.While | ast.BoolOp):
            text = ast.unparse(node.test if not isinstance(node, ast.BoolOp) else node)
            for word in ("config.mode", "'async'", "'sync'", "secagg", "secure", "Rounds"):
                assert word not in text, f"a branch on {word!r}: {text}"
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "_async" not in names and "_driver" not in names


@pytest.mark.parametrize(("mode", "policy", "thread"), [
    ("sync", SyncRounds, "fedhub-rounds"), ("async", AsyncRounds, "fedhub-async")])
def test_each_mode_runs_one_driver_thread(tmp_path, mode, policy, thread):
    _app, engine = make_app(tmp_path, mode=mode, buffer_size=2, auto_activate=True, start=True)
    try:
        assert type(engine._policy) is policy
        drivers = sorted(t.name for t in threading.enumerate() if t.name in ("fedhub-rounds", "fedhub-async"))
        assert drivers == [thread]
    finally:
        engine.stop()


def _failing_record(engine, method: str):
    """Make the storage refuse the next upload row (a full disk), once."""
    real = getattr(engine._storage, method)
    calls = {"n": 0}

    def refuse(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    setattr(engine._storage, method, refuse)


def test_a_sync_upload_folded_in_but_not_recorded_fails_its_round_which_runs_again(tmp_path):
    app, engine = make_app(tmp_path, min_devices=2, rounds=1, auto_activate=True, start=True)
    try:
        c = app.test_client()
        tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2")}
        for name, token in tokens.items():
            wait_task(c, name, token)
        _failing_record(engine, "add_update")
        with pytest.raises(OSError):
            engine.submit("d1", 1, update_body(1.0, 1, 0, 10), "key-1")
        wait_until(lambda: engine.round_failures(), 10, "the failed attempt recorded")
        assert "could not be recorded" in engine.round_failures()[0]["reason"]
        for name, token in tokens.items():  # the round runs again and completes
            task = wait_task(c, name, token)
            assert task["round"] == 1
            assert upload(c, name, token, 1, update_body(1.0, 1, 0, 10), f"again-{name}").status_code == 200
        wait_until(lambda: engine.status()["status"] == "finished", 10, "the run finished")
        assert [e["num_updates"] for e in engine.history()] == [2]
    finally:
        engine.stop()


def test_an_async_upload_folded_in_but_not_recorded_drops_its_buffer_and_the_version_is_made_later(tmp_path):
    app, engine = make_app(tmp_path, mode="async", buffer_size=2, rounds=1, auto_activate=True, start=True)
    try:
        c = app.test_client()
        tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2")}
        for name, token in tokens.items():
            wait_task(c, name, token)
        assert upload(c, "d1", tokens["d1"], 0, update_body(1.0, 0, 0, 10), "first").status_code == 200
        _failing_record(engine, "add_async_update")
        with pytest.raises(OSError):
            engine.submit("d2", 0, update_body(1.0, 0, 0, 10), "second")
        wait_until(lambda: engine.round_failures(), 10, "the failed attempt recorded")
        failure = engine.round_failures()[0]
        assert failure["round"] == 1 and "could not be recorded" in failure["reason"]
        assert not list((tmp_path / "state" / "async").glob("*.safetensors"))  # no orphan body
        for name, token in tokens.items():  # both send again: version 1 is made from them
            assert upload(c, name, token, 0, update_body(2.0, 0, 0, 10), f"again-{name}").status_code == 200
        wait_until(lambda: engine.status()["status"] == "finished", 10, "the run finished")
        history = engine.history()
        assert [e["num_updates"] for e in history] == [2]
        assert sorted(u["device"] for u in history[0]["updates"]) == ["d1", "d2"]
    finally:
        engine.stop()


def test_each_round_records_the_bytes_it_took_in_and_sent_out(tmp_path):
    """``bytes_up``: the accepted uploads' bodies; ``bytes_down``: the model downloads sent (a
    304 to a device that holds the version sends nothing and counts nothing)."""
    app, engine = make_app(tmp_path, min_devices=2, rounds=1, auto_activate=True, start=True)
    try:
        c = app.test_client()
        tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2")}
        down = up = 0
        for name, token in tokens.items():
            wait_task(c, name, token)
            got = c.get("/api/model", headers=bearer(token))
            assert got.status_code == 200
            down += len(got.data)
            again = c.get("/api/model", headers={**bearer(token), "If-None-Match": got.headers["ETag"]})
            assert again.status_code == 304 and not again.data
        bodies = {name: update_body(1.0, 1, 0, 10) for name in tokens}
        assert upload(c, "d1", tokens["d1"], 1, b"not safetensors").status_code == 400  # refused: not counted
        for name, token in tokens.items():
            assert upload(c, name, token, 1, bodies[name]).status_code == 200
            up += len(bodies[name])
        wait_until(lambda: engine.history(), 10, "round 1 complete")
        entry = engine.history()[0]
        assert (entry["bytes_up"], entry["bytes_down"]) == (up, down)
    finally:
        engine.stop()
