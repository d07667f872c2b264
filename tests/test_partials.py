"""Partial sums without a network: the codec, the aggregator's fold, and a relay's state on disk
across a kill (tests/test_relay.py runs them through real processes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedhub.device.client import Client
from fedhub.engine import partials, wire
from fedhub.engine.errors import Conflict, InvalidInput
from fedhub.engine.strategies import FedAdam, FedAvg, FedMedian
from fedhub.relay.sums import RelaySums

SPEC = {"w": ((3, 2), "float32"), "b": ((2,), "float32")}


def update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in SPEC.items()}


def test_a_partial_sum_folds_in_as_each_update_would():
    """The same updates, one by one or three of them summed by a relay: the same model (float64
    round-off only), the same per-device record."""
    template = {k: np.zeros(shape, np.float32) for k, (shape, _) in SPEC.items()}
    counts = [10, 25, 7, 40]
    for strategy in (FedAvg(), FedAdam()):
        direct = strategy.begin(template)
        for i, n in enumerate(counts):
            direct.add(f"d{i}", update(i), n, {"loss": float(i)})
        relayed = strategy.begin(template)
        relayed.add("d0", update(0), counts[0], {"loss": 0.0})
        part = partials.PartialSum(1, 0)
        for i, n in enumerate(counts[1:], start=1):
            part.fold(f"d{i}", update(i), n, {"loss": float(i)}, token=f"token-{i}")
        decoded = partials.decode(part.encode(), SPEC)
        relayed.add_partial(decoded.shares, decoded.sums, "edge")
        one, summed = direct._sum.mean(), relayed._sum.mean()  # the float64 means, before any cast
        for k in template:
            np.testing.assert_allclose(summed[k], one[k], rtol=1e-12, atol=1e-15)
        a, b = direct.result(), relayed.result()
        for k in template:
            np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-6, atol=1e-7)
        assert a.metrics["num_examples"] == b.metrics["num_examples"] == sum(counts)
        assert a.metrics["fit_metrics"] == pytest.approx(b.metrics["fit_metrics"])
        assert b.metrics["updates"]["d2"] == {"num_examples": 7, "status": "used", "relay": "edge"}


def test_under_central_dp_a_relay_sums_clipped_changes_as_the_server_clips_each():
    """Central DP clips each device's change to C and sums them, each counting once: a relay
    does the same for its devices (the round says C), and the server takes the sum with their
    count of unclipped changes; a sum longer than its devices times C is refused."""
    from fedhub.engine.privacy.strategy import DPFixedClipping

    template = {k: np.zeros(shape, np.float32) for k, (shape, _) in SPEC.items()}
    counts = [10, 25, 7, 40]
    strategy = DPFixedClipping(FedAvg(), noise_multiplier=0.0, clipping_norm=2.0,
                               rng=np.random.default_rng(0))
    direct, relayed = strategy.begin(template), strategy.begin(template)
    assert relayed.partial_clipping_norm == 2.0 and FedAvg().begin(template).partial_clipping_norm is None
    updates = [{k: v * (0.1 if i == 2 else 3.0) for k, v in update(i).items()} for i in range(4)]
    for i, n in enumerate(counts):
        direct.add(f"d{i}", updates[i], n)
    relayed.add("d0", updates[0], counts[0])
    part = partials.PartialSum(1, 0, clipping_norm=2.0)
    for i, n in enumerate(counts[1:], start=1):
        part.fold(f"d{i}", updates[i], n, token=f"t{i}", reference=template)
    decoded = partials.decode(part.encode(), SPEC)
    assert (decoded.clipping_norm, decoded.unclipped) == (2.0, 1)  # d2's small change is within C
    relayed.add_partial(decoded.shares, decoded.sums, "edge", decoded.unclipped)
    for k in template:
        np.testing.assert_allclose(relayed._sum[k], direct._sum[k], rtol=1e-12, atol=1e-15)
    assert relayed._clipped == direct._clipped == 3
    a, b = direct.result(), relayed.result()
    for k in template:  # no noise (multiplier 0): the same private mean
        np.testing.assert_allclose(a.weights[k], b.weights[k], rtol=1e-6, atol=1e-7)
    assert b.metrics["updates"]["d3"]["relay"] == "edge"
    # a relay that did not clip: its sum is longer than 3 devices x C, refused, nothing counted
    loose = strategy.begin(template)
    unclipped = partials.PartialSum(1, 0)
    for i in range(1, 4):
        unclipped.fold(f"d{i}", updates[i], 1, token="t")
    with pytest.raises(InvalidInput) as err:
        loose.add_partial(tuple(unclipped.shares.values()), unclipped._sums, "edge", 3)
    assert err.value.field == "clipping_norm" and loose.count == 0


def test_only_strategies_that_need_the_sum_alone_take_partial_sums():
    assert FedAvg.sums_only and FedAdam.sums_only and not FedMedian.sums_only


def test_a_device_is_counted_once_even_through_a_partial_sum():
    template = {k: np.zeros(shape, np.float32) for k, (shape, _) in SPEC.items()}
    agg = FedAvg().begin(template)
    agg.add("d1", update(1), 5)
    part = partials.PartialSum(1, 0)
    part.fold("d1", update(1), 5, token="t1")
    decoded = partials.decode(part.encode(), SPEC)
    with pytest.raises(ValueError, match="already sent"):
        agg.add_partial(decoded.shares, decoded.sums, "edge")
    assert agg.total_examples == 5


@pytest.mark.parametrize(("meta", "field"), [
    ({"format": "fedhub/1"}, "format"),
    ({"devices": "[]"}, "devices"),
    ({"devices": "{}"}, "devices"),
    ({"devices": "not json"}, "devices"),
    ({"devices": json.dumps([{"name": "d", "num_examples": -1}])}, "devices[0].num_examples"),
    ({"devices": json.dumps([{"name": "", "num_examples": 1}])}, "devices[0].name"),
    ({"devices": json.dumps([{"name": "d", "num_examples": 1, "metrics": {"m": "x"}, "token": "t"}])},
     "metrics"),
    ({"devices": json.dumps([{"name": "d", "num_examples": 1}])}, "devices[0].token"),
    ({"devices": json.dumps([{"name": "d", "num_examples": 1, "token": ""}])}, "devices[0].token"),
    ({"devices": json.dumps([{"name": "d", "num_examples": 1, "token": "t" * 201}])}, "devices[0].token"),
    ({"clipping_norm": "nan", "unclipped": "0"}, "clipping_norm"),
    ({"clipping_norm": "-1", "unclipped": "0"}, "clipping_norm"),
    ({"unclipped": "0"}, "clipping_norm"),
    ({"clipping_norm": "1.5"}, "unclipped"),
    ({"clipping_norm": "1.5", "unclipped": "2"}, "unclipped"),
    ({"clipping_norm": "1.5", "unclipped": "-1"}, "unclipped"),
    ({"round": "-1"}, "round"),
    ({"model_version": "x"}, "model_version"),
])
def test_decode_names_the_field_at_fault(meta, field):
    from safetensors.numpy import save

    base = {"format": partials.FORMAT, "round": "1", "model_version": "0",
            "devices": json.dumps([{"name": "d", "num_examples": 1, "token": "t"}])}
    tensors = {k: np.ones(shape) for k, (shape, _) in SPEC.items()}
    with pytest.raises(InvalidInput) as err:
        partials.decode(save(tensors, metadata={**base, **meta}), SPEC)
    assert err.value.field == field


def _sums(tmp_path) -> RelaySums:
    return RelaySums(Client("http://127.0.0.1:9", "edge"), state_dir=tmp_path, flush_after=300)


def _meta(n: int) -> wire.Meta:
    return wire.Meta(round=1, model_version=0, num_examples=n, metrics={"loss": 0.5})


def test_what_a_relay_acknowledged_survives_a_kill_with_its_keys(tmp_path):
    sums = _sums(tmp_path)
    sums.fold("d1", "t-d1", 1, update(1), _meta(10), "key-1", "digest-1")
    sums.fold("d2", "t-d2", 1, update(2), _meta(20), "key-2", "digest-2")
    del sums  # killed: nothing more written
    again = _sums(tmp_path)
    assert again.view()["pending"] == {"1": 2}
    assert again.fold("d1", "t-d1", 1, update(1), _meta(10), "key-1", "digest-1")["duplicate"] is True
    with pytest.raises(Conflict):
        again.fold("d1", "t-d1", 1, update(9), _meta(10), "key-x", "digest-x")
    body = again._pending[1].encode()
    decoded = partials.decode(body, SPEC)
    want = {k: update(1)[k].astype(np.float64) * 10 + update(2)[k].astype(np.float64) * 20 for k in SPEC}
    for k in SPEC:
        np.testing.assert_array_equal(decoded.sums[k], want[k])


def test_a_kill_between_the_outbox_copy_and_the_pending_sum_sends_it_once(tmp_path):
    """Killed after writing the bytes to send and before removing the pending sum: the restarted
    relay sends the outbox copy and drops the pending one, so no device goes twice."""
    sums = _sums(tmp_path)
    sums.fold("d1", "t-d1", 1, update(1), _meta(10), "key-1", "digest-1")
    body = sums._pending[1].encode()
    sums._save_outbox(1, body)  # the step before the pending file is removed
    again = _sums(tmp_path)
    assert again.view()["pending"] == {} and again.view()["outbox"] == 1
    assert not list(tmp_path.glob("pending-*"))


def test_a_relay_refuses_what_the_server_would(tmp_path):
    sums = _sums(tmp_path)
    bad = update(1)
    bad["w"][0, 0] = np.nan
    with pytest.raises(InvalidInput) as err:
        sums.fold("d1", "t-d1", 1, bad, _meta(10))
    assert err.value.field == "w"
    with pytest.raises(InvalidInput):
        sums.fold("d1", "t-d1", 1, update(1), _meta(0))
    sums.fold("d1", "t-d1", 1, update(1), _meta(10))
    with pytest.raises(Conflict) as conflict:
        sums.fold("d2", "t-d2", 1, update(2), wire.Meta(round=1, model_version=3, num_examples=5))
    assert conflict.value.field == "model_version"
    assert sums.view()["pending"] == {"1": 1}


def test_a_round_that_runs_again_starts_its_sum_afresh(tmp_path):
    sums = _sums(tmp_path)
    sums.observe({"status": "running", "partial_sums": True, "round": {"number": 1, "started_at": 1.0,
                                                                       "selected": ["d1"], "reported": []}})
    sums.fold("d1", "t-d1", 1, update(1), _meta(10), "k", "d")
    sums.observe({"status": "running", "partial_sums": True, "round": {"number": 1, "started_at": 2.0,
                                                                       "selected": ["d1"], "reported": []}})
    assert sums.view()["pending"] == {}
    assert sums.fold("d1", "t-d1", 1, update(1), _meta(10), "k2", "d2")["duplicate"] is False


def test_a_relay_looks_again_once_when_an_update_comes_before_it_saw_the_round(tmp_path):
    """A device handed round 2's task through the relay may send its update before the relay's
    watcher has seen round 2 open: the relay then looks at the status again (once a round), so
    the update is summed rather than passed on; a round it never handed, or one open, does not."""
    sums = _sums(tmp_path)
    round_1 = {"status": "running", "partial_sums": True, "round": {"number": 1, "started_at": 1.0,
                                                                    "selected": ["d1"], "reported": []}}
    sums.observe(round_1)
    assert not sums.behind("d1", 1)  # the round seen is the update's
    assert not sums.behind("d1", 2)  # never handed round 2: no request to the server for it
    sums.passing("d1", {"action": "train", "round": 2})
    assert sums.behind("d1", 2) and not sums.behind("d1", 2)  # looked again once
    sums.observe({**round_1, "round": {**round_1["round"], "number": 2, "started_at": 2.0}})
    assert sums.takes(2)
    assert not sums.behind("d1", 2, masked=True)  # not a secure round


def test_a_relay_sums_masked_updates_in_the_field_and_keeps_them_across_a_kill(tmp_path):
    """A secure round: the parameters come with its first stage's task, the masked updates are
    summed only at the masked stage, what the relay acknowledged survives a kill, and the sum
    it sends counts in the server's round as each device's own input would."""
    from fedhub.engine.secagg import MaskedSum, ProtocolViolation
    from tests.test_secagg import Round

    rnd = Round()
    rnd.advertise()
    rnd.share()
    p = rnd.params
    sums = _sums(tmp_path)
    masked_stage = {"status": "running", "partial_sums": False, "round": {
        "number": p.round, "started_at": 1.0, "selected": list(p.order), "reported": [],
        "secagg": {"stage": "masked"}}}
    sums.observe(masked_stage)
    assert not sums.takes_masked(p.round)  # its parameters not seen yet: each update passes through
    advertise = {"action": "secagg", "round": p.round, "stage": "advertise", "message": p.to_dict()}
    assert sums.passing("dev-0", advertise) is None
    assert sums.takes_masked(p.round)
    bodies = {n: rnd.masked_input(n).to_bytes(p) for n in ("dev-0", "dev-1", "dev-2")}
    assert sums.fold_masked("dev-0", "t0", p.round, bodies["dev-0"])["held"] == 1
    assert sums.fold_masked("dev-1", "t1", p.round, bodies["dev-1"])["held"] == 2
    with pytest.raises(ProtocolViolation):  # another device's message
        sums.fold_masked("dev-2", "t2", p.round, bodies["dev-0"][:-1])
    with pytest.raises(InvalidInput) as err:
        sums.fold_masked("dev-2", "t2", p.round, bodies["dev-0"])
    assert err.value.field == "device"
    with pytest.raises(Conflict) as conflict:  # a device the round did not select
        sums.fold_masked("stranger", "t9", p.round, bodies["dev-0"])
    assert conflict.value.field == "round"
    del sums  # killed
    again = _sums(tmp_path)
    assert again.view()["pending"] == {str(p.round): 2}
    assert again.fold_masked("dev-0", "t0", p.round, bodies["dev-0"])["duplicate"] is True
    with pytest.raises(Conflict):
        again.fold_masked("dev-0", "t0", p.round, bodies["dev-1"].replace(b"dev-1", b"dev-0"))
    again.observe(masked_stage)
    again.fold_masked("dev-2", "t2", p.round, bodies["dev-2"])
    message = MaskedSum.from_bytes(again._pending[p.round].encode(), p, "edge")
    assert message.devices == ("dev-0", "dev-1", "dev-2") and message.tokens == ("t0", "t1", "t2")
    assert rnd.server.receive_sum(message) is False
    for n in sorted(set(p.order) - set(message.devices)):
        rnd.server.receive_bytes(n, rnd.masked_input(n).to_bytes(p))
    rnd.sent_masked = set(p.order)
    rnd.server.close_stage()
    rnd.check(rnd.unmask())
    later = {**masked_stage, "round": {**masked_stage["round"], "secagg": {"stage": "unmask"}}}
    again.observe(later)
    assert not again.takes_masked(p.round)
