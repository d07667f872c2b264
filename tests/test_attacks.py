"""Device-side attacks: each does exactly what it says, only to floating-point weights, and the
server's wire format still accepts what it sends (the defence is the strategy's job)."""

from __future__ import annotations

import numpy as np
import pytest

from fedhub.device.attacks import (
    ATTACKS,
    Constant,
    LabelFlip,
    Noise,
    Scale,
    SignFlip,
    describe_attacks,
    make_attack,
    parse_attack,
)
from fedhub.engine import wire
from fedhub.engine.params import ParamError


@pytest.fixture
def weights():
    rng = np.random.default_rng(0)
    glob = {"k": rng.normal(size=(30, 20)).astype(np.float32), "b": rng.normal(size=20),
            "h": rng.normal(size=(4,)).astype(np.float16), "steps": np.array([7, 9], np.int64)}
    trained = {n: (a + rng.normal(scale=0.1, size=a.shape)).astype(a.dtype) if a.dtype.kind == "f"
               else a + 1 for n, a in glob.items()}
    return glob, trained


def _floats(w):
    return {n: a for n, a in w.items() if a.dtype.kind == "f"}


def test_sign_flip_reverses_the_update(weights):
    glob, trained = weights
    for factor in (1.0, 4.0):
        out = SignFlip(factor=factor).poison_weights(trained, glob, np.random.default_rng())
        for n, a in _floats(trained).items():
            g = glob[n].astype(np.float64)
            expected = (g - factor * (a.astype(np.float64) - g)).astype(a.dtype)
            np.testing.assert_array_equal(out[n], expected)
            assert out[n].dtype == a.dtype
        np.testing.assert_array_equal(out["steps"], trained["steps"])  # integers are left alone


def test_scale_multiplies_the_update(weights):
    glob, trained = weights
    out = Scale(factor=10).poison_weights(trained, glob, np.random.default_rng())
    delta = out["k"].astype(np.float64) - glob["k"]
    expected = 10 * (trained["k"].astype(np.float64) - glob["k"])
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["steps"], trained["steps"])


def test_noise_is_gaussian_with_sigma_and_reproducible(weights):
    glob, trained = weights
    attack = Noise(sigma=0.5)
    a = attack.poison_weights(trained, glob, np.random.default_rng(1))
    b = attack.poison_weights(trained, glob, np.random.default_rng(1))
    np.testing.assert_array_equal(a["k"], b["k"])
    diff = a["k"].astype(np.float64) - trained["k"]
    assert abs(diff.mean()) < 0.05 and diff.std() == pytest.approx(0.5, rel=0.1)
    np.testing.assert_array_equal(a["steps"], trained["steps"])


def test_constant_sets_every_weight_and_stays_finite_in_each_dtype(weights):
    glob, trained = weights
    out = Constant(value=1e38).poison_weights(trained, glob, np.random.default_rng())
    assert (out["k"] == np.float32(1e38)).all() and (out["b"] == 1e38).all()
    assert (out["h"] == np.finfo(np.float16).max).all()  # the largest finite float16
    np.testing.assert_array_equal(out["steps"], trained["steps"])
    # well formed: the server's decoder accepts it, so only the strategy stands in the way
    body = wire.encode(out, wire.Meta(round=1, model_version=0, num_examples=1))
    decoded, meta = wire.decode(body, wire.spec_of(glob), require_examples=True)
    assert meta.num_examples == 1 and (decoded["k"] == np.float32(1e38)).all()


def test_label_flip_maps_y_to_nine_minus_y_and_leaves_weights_alone(weights):
    glob, trained = weights
    y = np.array([0, 1, 2, 9, 5], np.uint8)
    flipped = LabelFlip().poison_labels(y)
    np.testing.assert_array_equal(flipped, [9, 8, 7, 0, 4])
    assert flipped.dtype == np.uint8
    np.testing.assert_array_equal(LabelFlip(num_classes=3).poison_labels(np.array([0, 1, 2])), [2, 1, 0])
    with pytest.raises(ValueError, match=r"integer labels in 0\.\.9"):
        LabelFlip().poison_labels(np.array([0, 10]))
    assert LabelFlip().poison_weights(trained, glob, np.random.default_rng()) == trained
    np.testing.assert_array_equal(Scale().poison_labels(y), y)  # weight attacks keep the labels


def test_parsing_and_declaring_attacks():
    assert parse_attack("scale", ["factor=10"]) == Scale(factor=10.0)
    assert parse_attack("sign-flip") == SignFlip()
    assert make_attack("noise", sigma=2) == Noise(sigma=2.0)
    assert parse_attack("constant", ["value=-1e30"]).describe() == {"kind": "constant",
                                                                     "params": {"value": -1e30}}
    assert [a["kind"] for a in describe_attacks()] == list(ATTACKS)
    assert describe_attacks()[1]["params"] == [{"name": "factor", "type": "float", "default": 10.0,
                                                "help": "how many times the honest update to send"}]


@pytest.mark.parametrize("kind,args,message", [
    ("flip", [], "unknown attack 'flip'; choose from sign-flip, scale, noise, constant, label-flip"),
    ("scale", ["factr=10"], "attack scale: unknown key 'factr' (allowed keys: factor)"),
    ("scale", ["factor=ten"], "attack scale: factor must be a number, got 'ten' (allowed keys: factor)"),
    ("scale", ["factor=inf"], "factor must be a finite number"),
    ("noise", ["sigma=0"], "attack noise: sigma must be positive, got 0.0 (allowed keys: sigma)"),
    ("sign-flip", ["factor=-1"], "factor must be positive"),
    ("label-flip", ["num_classes=1"], "num_classes must be at least 2"),
    ("scale", ["10"], "attack scale: expected KEY=VALUE, got '10'"),
])
def test_bad_attacks_are_one_line_errors(kind, args, message):
    with pytest.raises(ParamError) as err:
        parse_attack(kind, args)
    assert message in str(err.value) and "\n" not in str(err.value)
