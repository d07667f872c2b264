import json
import struct

import numpy as np
import pytest

from fedhub.engine import wire
from fedhub.engine.errors import InvalidInput, TooLarge

rng = np.random.default_rng(0)
WEIGHTS = {"dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
           "dense/bias": rng.normal(size=(3,)).astype(np.float32)}
SPEC = wire.spec_of(WEIGHTS)
META = wire.Meta(round=2, model_version=1, num_examples=50, metrics={"loss": 0.5, "accuracy": 0.8})


def test_round_trip_keeps_tensors_and_metadata():
    weights, meta = wire.decode(wire.encode(WEIGHTS, META), SPEC)
    assert meta == META
    for name, a in WEIGHTS.items():
        assert weights[name].dtype == a.dtype
        np.testing.assert_array_equal(weights[name], a)


def test_body_is_safetensors_not_pickle():
    body = wire.encode(WEIGHTS, META)
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + n])
    assert header["__metadata__"]["format"] == "fedhub/1"
    assert set(header) - {"__metadata__"} == set(WEIGHTS)


def _refused(body, field=None, spec=SPEC, **kw):
    with pytest.raises(InvalidInput) as info:
        wire.decode(body, spec, **kw)
    if field is not None:
        assert info.value.field == field
    return info.value


def test_unknown_tensor_refused():
    e = _refused(wire.encode({**WEIGHTS, "evil": np.zeros(1, np.float32)}, META), "evil")
    assert "unknown" in e.message


def test_missing_tensor_refused():
    e = _refused(wire.encode({"dense/kernel": WEIGHTS["dense/kernel"]}, META), "dense/bias")
    assert "missing" in e.message


def test_wrong_shape_refused():
    bad = {**WEIGHTS, "dense/bias": np.zeros(4, np.float32)}
    assert "shape" in _refused(wire.encode(bad, META), "dense/bias").message


def test_wrong_dtype_refused():
    bad = {**WEIGHTS, "dense/bias": np.zeros(3, np.float64)}
    assert "dtype" in _refused(wire.encode(bad, META), "dense/bias").message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(value):
    bad = {**WEIGHTS, "dense/kernel": WEIGHTS["dense/kernel"].copy()}
    bad["dense/kernel"][1, 1] = value
    assert "NaN" in _refused(wire.encode(bad, META), "dense/kernel").message


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, -12])
def test_truncated_refused(cut):
    body = wire.encode(WEIGHTS, META)
    _refused(body[:cut], "body")


def test_oversized_refused():
    body = wire.encode(WEIGHTS, META)
    with pytest.raises(TooLarge):
        wire.decode(body, SPEC, max_bytes=len(body) - 1)
    wire.decode(body, SPEC, max_bytes=len(body))


def test_garbage_and_bad_header_refused():
    _refused(b"\x00" * 3)
    _refused(struct.pack("<Q", 10) + b"not json!!", "body")
    _refused(struct.pack("<Q", 2**40) + b"{}", "body")
    _refused(struct.pack("<Q", 2) + b"[]", "body")


def test_bad_metadata_refused():
    for meta, field in [({"round": "x"}, "round"), ({"num_examples": "-3"}, "num_examples"),
                        ({"metrics": "[1]"}, "metrics"), ({"metrics": '{"a": "b"}'}, "metrics")]:
        from safetensors.numpy import save
        _refused(save(WEIGHTS, metadata=meta), field)


def test_examples_required_for_updates():
    body = wire.encode(WEIGHTS, wire.Meta(round=1))
    assert _refused(body, "num_examples", require_examples=True)


def test_a_scalar_stays_a_scalar():
    """Strategy state holds scalars (FedAdam's step count) beside tensors."""
    body = wire.encode({"step": np.array(3.0), "m": np.ones((2, 3)).T}, wire.Meta())
    weights, _ = wire.decode(body)
    assert weights["step"].shape == () and weights["step"] == 3.0
    np.testing.assert_array_equal(weights["m"], np.ones((3, 2)))


def test_decoded_tensors_come_in_one_order():
    """Named arrays in a fixed order: the spec's when there is one, else the body's layout, however
    the safetensors library happens to hand them back."""
    weights = {f"layer{i}/{part}": np.full((i + 1,), i, np.float32)
               for i in range(12) for part in ("kernel", "bias")}
    body = wire.encode(weights, META)
    head = wire.header(body)
    laid_out = sorted((n for n in head if n != "__metadata__"), key=lambda n: head[n]["data_offsets"][0])
    orders = {tuple(wire.decode(body)[0]) for _ in range(20)}
    assert orders == {tuple(laid_out)}
    spec = dict(reversed(wire.spec_of(weights).items()))
    assert all(list(wire.decode(body, spec)[0]) == list(spec) for _ in range(20))
