"""The compression codecs against NumPy references: error bounds, unbiased stochastic rounding,
4-bit packing, top-k with error feedback, strict decoding of hostile bodies, the downlink."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from fedhub.engine import compression as c
from fedhub.engine import wire
from fedhub.engine.errors import InvalidInput

_init = np.random.default_rng(0)  # used here only: each test seeds its own generator
GLOBAL = {"dense/kernel": _init.normal(size=(37, 11)).astype(np.float32),
          "dense/bias": _init.normal(size=(11,)).astype(np.float32)}
del _init
SPEC = wire.spec_of(GLOBAL)
META = wire.Meta(round=3, model_version=2, num_examples=40, metrics={"loss": 0.5})


def local(scale: float = 0.01, seed: int = 1) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {n: (a + scale * g.normal(size=a.shape)).astype(np.float32) for n, a in GLOBAL.items()}


@pytest.mark.parametrize("text, expected", [
    ("none", c.Scheme()), ("q8", c.Scheme("q8")), ("q4", c.Scheme("q4")),
    ("q8:tensor", c.Scheme("q8", block=0)), ("q4:block=64", c.Scheme("q4", block=64)),
    ("topk:0.05", c.Scheme("topk", fraction=0.05))])
def test_parse_and_print_round_trip(text, expected):
    assert c.parse(text) == expected
    assert c.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "q16", "topk", "topk:0", "topk:1", "topk:x", "topk:nan",
                                  "q8:block=3", "q8:block=0", "q8:blocks=8", "none:1", "Q8"])
def test_parse_refuses_in_one_line(text):
    with pytest.raises(ValueError) as info:
        c.parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bits, block", [(8, 512), (4, 512), (8, 0), (4, 0), (4, 7 + 1)])
def test_quantization_error_is_within_one_scale_per_block(bits, block):
    x = (np.random.default_rng(10).normal(size=1001).astype(np.float32)
         * np.linspace(0.01, 3, 1001, dtype=np.float32))
    codes, scales = c.quantize(x, bits, block, np.random.default_rng(1))
    levels = c.LEVELS[bits]
    assert codes.dtype == np.int8 and np.abs(codes).max() <= levels
    # NumPy reference of the scales: max |x| per block over the levels
    width = block or x.size
    reference = [np.abs(x[i:i + width]).max() / levels for i in range(0, x.size, width)]
    np.testing.assert_allclose(scales, reference, rtol=1e-6)
    decoded = c.dequantize(codes, scales, block)
    per_value = scales[0] if block == 0 else np.repeat(scales, block)[: x.size]
    assert np.all(np.abs(decoded - x) <= per_value * (1 + 1e-5))


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased(bits):
    x = np.random.default_rng(11).normal(size=64).astype(np.float32)
    g = np.random.default_rng(2)
    trials = 4000
    total = np.zeros(x.size)
    for _ in range(trials):
        codes, scales = c.quantize(x, bits, 0, g)
        total += c.dequantize(codes, scales, 0)
    scale = np.abs(x).max() / c.LEVELS[bits]
    # each decoded value is x rounded up or down one scale: the mean of `trials` is within
    # 5 standard errors (at most scale/2 each) of x, where deterministic rounding is off by up to scale/2
    assert np.all(np.abs(total / trials - x) <= 5 * 0.5 * scale / math.sqrt(trials))
    half = np.float32(0.5) * scale  # a value halfway between two levels: both equally often
    codes = np.array([c.quantize(np.array([half, scale * 127 if bits == 8 else scale * 7], np.float32),
                                 bits, 0, g)[0][0] for _ in range(2000)])
    assert 0.45 < codes.mean() < 0.55


def test_pack4_matches_a_reference_and_round_trips():
    codes = np.array([-7, 7, 0, -1, 3], dtype=np.int8)
    packed = c.pack4(codes)
    assert packed.tolist() == [(-7 + 8) | ((7 + 8) << 4), (0 + 8) | ((-1 + 8) << 4), (3 + 8) | (8 << 4)]
    assert c.unpack4(packed, 5).tolist() == codes.tolist()


def test_top_k_keeps_the_largest_magnitudes_in_order():
    x = np.array([0.1, -5, 2, 0, -3, 0.5], dtype=np.float32)
    index, values = c.top_k(x, 3)
    assert index.dtype == np.uint32 and index.tolist() == [1, 2, 4]
    assert values.tolist() == [-5, 2, -3]
    assert c.kept(1000, 0.01) == 10 and c.kept(10, 0.1) == 1 and c.kept(3, 0.01) == 1


@pytest.mark.parametrize("scheme", ["none", "q8", "q4", "q8:tensor", "topk:0.1"])
def test_update_round_trip(scheme):
    s = c.parse(scheme)
    weights = local()
    body, left = c.encode_update(weights, GLOBAL, s, META, rng=np.random.default_rng(3))
    decoded, meta = c.decode_update(body, SPEC, s)
    assert meta == META
    rebuilt = c.apply(GLOBAL, decoded) if s.active else decoded
    full = sum(a.nbytes for a in GLOBAL.values())
    if s.kind == "none":
        for n in GLOBAL:
            np.testing.assert_array_equal(rebuilt[n], weights[n])
    elif s.kind == "topk":
        for n in GLOBAL:  # what was sent plus what was left is the whole delta
            np.testing.assert_allclose(decoded[n] + left[n], weights[n] - GLOBAL[n], atol=1e-7)
            assert np.count_nonzero(decoded[n]) == c.kept(GLOBAL[n].size, 0.1)
    else:
        levels = c.LEVELS[s.bits]
        for n in GLOBAL:
            delta = weights[n] - GLOBAL[n]
            assert np.abs(rebuilt[n] - weights[n]).max() <= np.abs(delta).max() / levels * 1.01
        assert len(body) < full * (0.3 if s.bits == 8 else 0.2) + 1000
    assert rebuilt["dense/kernel"].dtype == np.float32


def test_error_feedback_sends_what_was_left_later(tmp_path):
    s = c.parse("topk:0.1")
    store = c.Residual(tmp_path / "residual.safetensors")
    sent_total = {n: np.zeros_like(a) for n, a in GLOBAL.items()}
    true_total = {n: np.zeros_like(a) for n, a in GLOBAL.items()}
    for r in range(5):
        weights = local(seed=10 + r)
        body, left = c.encode_update(weights, GLOBAL, s, META, residual=store.load(s))
        store.save(left, s)
        decoded, _ = c.decode_update(body, SPEC, s)
        for n in GLOBAL:
            sent_total[n] += decoded[n]
            true_total[n] += weights[n] - GLOBAL[n]
    saved = c.Residual(tmp_path / "residual.safetensors").load(s)  # as a restarted device reads it
    for n in GLOBAL:  # nothing lost: sent + residual = every delta
        np.testing.assert_allclose(sent_total[n] + saved[n], true_total[n], atol=1e-5)
    assert c.Residual(tmp_path / "residual.safetensors").load(c.parse("topk:0.2")) == {}


# hostile bodies ------------------------------------------------------------------------------
def body_with(scheme: str, change=None, metadata=None) -> bytes:
    s = c.parse(scheme)
    tensors = c.compress({n: local()[n] - a for n, a in GLOBAL.items()}, s, np.random.default_rng(0))
    if change:
        change(tensors)
    return wire.encode(tensors, META, {"compression": str(s), **(metadata or {})})


def refused(body: bytes, scheme: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        c.decode_update(body, SPEC, c.parse(scheme))
    return info.value


def test_a_wrong_scheme_is_refused():
    assert refused(body_with("q4"), "q8").field == "compression"
    assert refused(body_with("q8", metadata={"compression": "zip"}), "q8").field == "compression"
    assert refused(wire.encode(local(), META), "q8").field == "compression"  # plain weights
    assert refused(body_with("q8"), "none").field == "compression"


def test_a_wrong_scale_shape_is_refused():
    def more_scales(t):
        t["dense/kernel::scales"] = np.ones(5, np.float32)
    e = refused(body_with("q8", more_scales), "q8")
    assert e.field == "dense/kernel::scales" and "shape" in e.message


def test_a_wrong_dtype_is_refused():
    def wide(t):
        t["dense/bias"] = t["dense/bias"].astype(np.int16)
    assert refused(body_with("q8", wide), "q8").field == "dense/bias"

    def signed(t):
        t["dense/kernel::indices"] = t["dense/kernel::indices"].astype(np.int32)
    assert "dtype" in refused(body_with("topk:0.1", signed), "topk:0.1").message


def test_a_sparsity_that_does_not_match_is_refused():
    e = refused(body_with("topk:0.2"), "topk:0.1")
    assert e.field == "compression"

    def one_more(t):
        t["dense/bias"] = np.append(t["dense/bias"], np.float32(1))
        t["dense/bias::indices"] = np.append(t["dense/bias::indices"], np.uint32(10))
    e = refused(body_with("topk:0.1", one_more), "topk:0.1")
    assert e.field in ("dense/bias", "dense/bias::indices") and "shape" in e.message


def test_an_index_out_of_range_or_repeated_is_refused():
    def out_of_range(t):
        t["dense/kernel::indices"][-1] = 37 * 11
    e = refused(body_with("topk:0.1", out_of_range), "topk:0.1")
    assert e.field == "dense/kernel::indices" and "out of range" in e.message

    def repeated(t):
        t["dense/kernel::indices"][1] = t["dense/kernel::indices"][0]
    assert "increasing" in refused(body_with("topk:0.1", repeated), "topk:0.1").message


def test_codes_and_scales_out_of_bounds_are_refused():
    def minus_128(t):
        t["dense/bias"][0] = -128
    assert refused(body_with("q8", minus_128), "q8").field == "dense/bias"

    def nibble_zero(t):
        t["dense/bias"][0] = 0x80  # low nibble 0: code -8
    assert refused(body_with("q4", nibble_zero), "q4").field == "dense/bias"

    def negative(t):
        t["dense/bias::scales"][0] = -1
    assert refused(body_with("q8", negative), "q8").field == "dense/bias::scales"

    def huge(t):
        t["dense/bias::scales"][0] = np.finfo(np.float32).max
        t["dense/bias"][0] = 127
    assert refused(body_with("q8", huge), "q8").field == "dense/bias::scales"

    def nan(t):
        t["dense/bias::scales"][0] = np.nan
    assert refused(body_with("q8", nan), "q8").field == "dense/bias::scales"


def test_metadata_that_is_no_object_is_refused():
    body = body_with("q8")
    (n,) = struct.unpack("<Q", body[:8])
    head = json.loads(body[8:8 + n])
    head["__metadata__"] = ["q8"]
    text = json.dumps(head).encode()
    hostile = struct.pack("<Q", len(text)) + text + body[8 + n:]
    assert refused(hostile, "q8").field == "metadata"


def test_missing_and_unknown_parts_are_refused():
    def no_scales(t):
        del t["dense/bias::scales"]
    assert refused(body_with("q8", no_scales), "q8").field == "dense/bias::scales"

    def extra(t):
        t["dense/bias::indices"] = np.zeros(1, np.uint32)
    assert refused(body_with("q8", extra), "q8").field == "dense/bias::indices"


def test_the_header_names_the_scheme_and_carries_no_pickle():
    body = body_with("topk:0.1")
    (n,) = struct.unpack("<Q", body[:8])
    head = json.loads(body[8:8 + n])
    assert head["__metadata__"]["compression"] == "topk:0.1"
    assert head["dense/kernel::indices"]["dtype"] == "U32"


# the downlink --------------------------------------------------------------------------------
def test_downlink_changes_track_the_global_model():
    down = c.Downlink(c.parse("q8"), rng=np.random.default_rng(0))
    down.install(0, GLOBAL)
    version, held = c.decode_download(down.body_for(()), None)
    assert version == 0
    np.testing.assert_array_equal(held["dense/bias"], GLOBAL["dense/bias"])
    current = GLOBAL
    for v in range(1, 6):
        current = {n: a + 0.05 * np.float32(v) for n, a in local(seed=v).items()}
        down.install(v, current)
        body = down.body_for({down.etag(v - 1)})
        assert len(body) < len(down.full) * 0.3 + 400  # 400: the header
        version, held = c.decode_download(body, (v - 1, held))
        assert version == v
        for n in GLOBAL:  # the device holds exactly the server's broadcast model ...
            np.testing.assert_array_equal(held[n], down.model[n])
            # ... within one quantization step of the global model (the error does not pile up)
            step = np.abs(current[n] - held[n]).max()
            assert step <= 0.1 / 127 * 1.5 + 1e-6
    assert down.body_for({"v4-elsewhere"}) == down.full
    with pytest.raises(InvalidInput):
        c.decode_download(down.change, (3, held))


# every strategy that takes weights: the engine adds the delta back ---------------------------
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedmedian", "krum"])
def test_the_engine_aggregates_compressed_updates_as_their_weights(tmp_path, strategy):
    from fedhub.engine.config import TrainingConfig
    from fedhub.engine.strategies import make_strategy
    from tests.conftest import wait_until
    from tests.test_api import INITIAL, bearer, make_app, register, upload, wait_task

    scheme = c.parse("q4")
    app, engine = make_app(tmp_path, strategy=strategy, min_devices=3, rounds=1, auto_activate=True,
                           start=True, training=TrainingConfig(compression="q4"))
    try:
        client = app.test_client()
        tokens = {n: register(client, n).get_json()["token"] for n in ("d1", "d2", "d3")}
        reference = make_strategy(strategy).begin(INITIAL)
        for i, (name, token) in enumerate(tokens.items()):
            task = wait_task(client, name, token)
            assert task["config"]["compression"] == "q4"
            g = np.random.default_rng(i)
            trained = {k: (v + g.normal(size=v.shape)).astype(np.float32) for k, v in INITIAL.items()}
            meta = wire.Meta(round=1, model_version=0, num_examples=10 + i)
            body, _ = c.encode_update(trained, INITIAL, scheme, meta, rng=g)
            assert upload(client, name, token, 1, body).status_code == 200
            delta, _ = c.decode_update(body, wire.spec_of(INITIAL), scheme)
            reference.add(name, c.apply(INITIAL, delta), 10 + i)
        wait_until(lambda: engine.global_weights()[0] == 1, 15, "the round to close", interval=0.05)
        expected = reference.result().weights
        for k, v in engine.global_weights()[1].items():
            np.testing.assert_array_equal(v, expected[k])
        assert client.get("/api/devices/d1/task", headers=bearer(tokens["d1"])).status_code == 200
    finally:
        engine.stop()
