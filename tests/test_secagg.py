"""Secure aggregation (fedhub.engine.secagg): exact sums through dropouts, masks that look like noise,
lying devices refused, and every message through its byte form."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import save as st_save
from scipy import stats

from fedhub.engine import wire
from fedhub.engine.secagg import (
    AdvertiseKeys,
    ConfigError,
    DeviceRound,
    KeyDirectory,
    MaskedInput,
    ProtocolViolation,
    RoundParams,
    SecAggConfig,
    ServerRound,
    ShareAuthenticationError,
    ShareBundle,
    ShareKeys,
    StaleMessage,
    TooFewSurvivors,
    UnmaskRequest,
    UnmaskResponse,
    crypto,
    flatten,
    unflatten,
)
from fedhub.engine.secagg.encoding import encode, pack, packed_size, quantize, unpack
from fedhub.engine.secagg.params import field_bits

NAMES = [f"dev-{i}" for i in range(10)]
ROUND = 7


class Round:
    """One round driven end to end, every message through its byte form, as HTTP would carry it."""

    def __init__(self, names=NAMES, *, length=300, shares=5, threshold=3, bits=32, clip=1.0,
                 max_weight=1000, seed=0, previous_keys=(), number=ROUND, quantization=0):
        self.config = SecAggConfig(shares=shares, threshold=threshold, bits=bits, clip_range=clip,
                                   max_weight=max_weight).quantized(quantization)
        self.params = self.config.for_round(number, names, length)
        self.server = ServerRound(self.params, previous_keys=previous_keys)
        self.devices = {n: DeviceRound(n, RoundParams.from_bytes(self.params.to_bytes()),
                                       rng=np.random.default_rng([seed, i]))
                        for i, n in enumerate(names)}
        self.seeds = {n: [seed, i] for i, n in enumerate(names)}
        rng = np.random.default_rng(seed)
        # Spread past the clip range so that clipping is exercised too.
        self.updates = {n: rng.normal(0, 0.7 * clip, length) for n in names}
        self.weights = {n: int(rng.integers(1, max_weight + 1)) for n in names}
        self.sent_masked: set[str] = set()
        self.advertised: dict[str, AdvertiseKeys] = {}

    def at(self, *positions):
        """Devices by ring position, so that dropouts can be placed where the graph allows them."""
        return {self.params.order[p] for p in positions}

    def advertise(self, drop=()):
        for n, d in self.devices.items():
            if n not in drop and n not in self.advertised:
                self.advertised[n] = d.advertise()
                self.server.receive_bytes(n, self.advertised[n].to_bytes())
        return self.server.close_stage()

    def share(self, drop=()):
        for n in sorted(self.server.expected() - set(drop)):
            directory = KeyDirectory.from_bytes(self.server.request(n).to_bytes())
            self.server.receive_bytes(n, self.devices[n].share_keys(directory).to_bytes())
        return self.server.close_stage()

    def masked(self, drop=()):
        for n in sorted(self.server.expected() - set(drop)):
            self.server.receive_bytes(n, self.masked_input(n).to_bytes(self.params))
            self.sent_masked.add(n)
        return self.server.close_stage()

    def masked_input(self, n):
        bundle = ShareBundle.from_bytes(self.server.request(n).to_bytes())
        return self.devices[n].masked_input(bundle, self.updates[n], self.weights[n])

    def unmask(self, drop=()):
        for n in sorted(self.server.expected() - set(drop)):
            request = UnmaskRequest.from_bytes(self.server.request(n).to_bytes())
            self.server.receive_bytes(n, self.devices[n].unmask(request).to_bytes())
        return self.server.finish()

    def run(self, advertise=(), share=(), masked=(), unmask=()):
        self.advertise(advertise)
        self.share(share)
        self.masked(masked)
        return self.unmask(unmask)

    def quantized_mean(self, names):
        """The weighted mean of the clipped, quantized updates, recomputed from each device's seed."""
        p = self.params
        total = sum(self.weights[n] * quantize(self.updates[n], p.clip_range, p.levels,
                                                np.random.default_rng(self.seeds[n]))
                    for n in names)
        return total * (p.clip_range / p.levels) / sum(self.weights[n] for n in names)

    def clipped_mean(self, names):
        c = self.params.clip_range
        return (sum(self.weights[n] * np.clip(self.updates[n], -c, c) for n in names)
                / sum(self.weights[n] for n in names))

    def check(self, result):
        survivors = sorted(self.sent_masked)
        assert list(result.survivors) == survivors
        assert result.total_weight == sum(self.weights[n] for n in survivors)
        np.testing.assert_allclose(result.mean, self.quantized_mean(survivors), rtol=0, atol=1e-12)
        # Within the quantization step of the unquantized mean.
        step = self.params.clip_range / self.params.levels
        assert np.abs(result.mean - self.clipped_mean(survivors)).max() <= step
        return result


# dropouts at each stage ------------------------------------------------------

SPARSE_DROPOUTS = {
    "none": {},
    "one after advertising": {"share": (0,)},
    "several after advertising": {"share": (0, 3, 6)},
    "one after sharing keys": {"masked": (0,)},
    "several after sharing keys": {"masked": (0, 3, 6)},
    "one after the masked input": {"unmask": (0,)},
    "several after the masked input": {"unmask": (0, 3, 6)},
    "one at each stage": {"advertise": (0,), "share": (2,), "masked": (5,), "unmask": (8,)},
}


@pytest.mark.parametrize("case", SPARSE_DROPOUTS)
def test_sparse_graph_sum_is_the_weighted_mean_through_dropouts(case):
    r = Round(seed=len(case))
    drops = {stage: r.at(*positions) for stage, positions in SPARSE_DROPOUTS[case].items()}
    result = r.check(r.run(**drops))
    recovered = drops.get("masked", set())
    assert set(result.recovered) == recovered  # dealt shares, then dropped: masks rebuilt
    assert set(result.dropped) == drops.get("advertise", set()) | drops.get("share", set())
    assert result.metrics()["secagg_survivors"] == len(r.sent_masked)


@pytest.mark.parametrize("stage", ["share", "masked", "unmask"])
def test_complete_graph_survives_up_to_threshold_dropouts(stage):
    r = Round(NAMES[:6], shares=7, threshold=4, seed=3)  # shares >= devices: a complete graph
    assert r.params.shares == 6
    r.check(r.run(**{stage: set(NAMES[:2])}))


def test_sixty_four_bit_field_and_tensors_round_trip():
    spec = {"dense/kernel": ((4, 5), "float32"), "dense/bias": ((5,), "float32"), "scale": ((), "float32")}
    rng = np.random.default_rng(5)
    r = Round(NAMES[:4], length=26, bits=64, shares=5, threshold=3, seed=9)
    tensors = {}
    for n in r.devices:
        tensors[n] = {k: rng.normal(0, 0.3, s).astype(d) for k, (s, d) in spec.items()}
        r.updates[n] = flatten(tensors[n])
    result = r.check(r.run(masked=r.at(1)))
    weights = result.weights(spec)
    assert {k: (v.shape, str(v.dtype)) for k, v in weights.items()} == spec
    np.testing.assert_array_equal(flatten(weights), result.mean.astype(np.float32))
    assert flatten(unflatten(r.updates[NAMES[0]], spec)).tolist() == pytest.approx(
        r.updates[NAMES[0]].astype(np.float32).tolist())


def test_extreme_inputs_at_the_overflow_bound_decode_exactly():
    """Every device at +clip (then -clip) with the largest weight: the bound holds in 16 bits."""
    for sign in (1, -1):
        r = Round(NAMES[:5], length=50, bits=16, max_weight=40, shares=5, threshold=3, clip=0.5)
        assert 5 * 40 * r.params.levels <= 2**15 - 1 < 5 * 40 * (r.params.levels + 1)
        for n in r.devices:
            r.updates[n] = np.full(50, sign * 3.0)  # clipped to +-0.5
            r.weights[n] = 40
        result = r.check(r.run())
        np.testing.assert_allclose(result.mean, sign * 0.5, atol=1e-12)


# too few survivors -------------------------------------------------------------

def test_too_few_advertise():
    r = Round()
    with pytest.raises(TooFewSurvivors, match="advertised keys"):
        r.advertise(drop=set(NAMES[2:]))
    with pytest.raises(StaleMessage, match="failed"):
        r.server.request(NAMES[0])


def test_too_few_neighbours_after_the_masked_input_names_the_device():
    r = Round()
    r.advertise()
    r.share()
    # The device at position 2 keeps only itself and one neighbour of its five: below 3.
    with pytest.raises(TooFewSurvivors) as err:
        r.masked(drop=r.at(0, 1, 3))
    assert err.value.device in r.at(1, 2)
    assert err.value.code == "secagg_too_few_survivors"
    with pytest.raises(StaleMessage, match="failed"):
        r.server.receive(NAMES[0], r.advertised[NAMES[0]])


def test_too_few_answers_to_unmask():
    r = Round(NAMES[:5], shares=5, threshold=3)
    r.advertise()
    r.share()
    r.masked()
    with pytest.raises(TooFewSurvivors, match="answered the unmask request"):
        r.unmask(drop=set(NAMES[:3]))


def test_too_few_masked_inputs():
    r = Round(NAMES[:5], shares=5, threshold=3)
    r.advertise()
    r.share()
    with pytest.raises(TooFewSurvivors, match="2 devices sent masked inputs"):
        r.masked(drop=set(NAMES[:3]))


def test_device_refuses_to_unmask_with_fewer_survivors_than_the_threshold():
    r = Round(NAMES[:5], shares=5, threshold=3)
    r.advertise()
    r.share()
    r.masked()
    me = NAMES[0]
    others = [n for n in NAMES[1:5]]
    with pytest.raises(TooFewSurvivors):
        r.devices[me].unmask(UnmaskRequest(round=ROUND, survivors=(me, others[0]), dropped=tuple(others[1:])))


# the masked upload looks like noise ----------------------------------------------

def test_one_masked_upload_is_indistinguishable_from_uniform():
    """A constant update (the most structured plaintext there is) masked: its bytes and its
    words are uniform by chi-square and Kolmogorov-Smirnov; the unmasked field vector is not."""
    length = 50_000
    r = Round(NAMES[:3], length=length, shares=3, threshold=2)
    for n in r.devices:
        r.updates[n] = np.full(length, 0.25)
    r.advertise()
    r.share()
    masked = r.masked_input(NAMES[0])
    raw = np.frombuffer(wire.decode(masked.to_bytes(r.params))[0]["masked"].tobytes(), dtype=np.uint8)
    words = masked.vector.astype(np.float64) / 2**32
    assert stats.chisquare(np.bincount(raw, minlength=256)).pvalue > 1e-6
    assert stats.kstest(words, "uniform").pvalue > 1e-6
    assert stats.chisquare(np.bincount((masked.vector >> np.uint64(24)).astype(np.int64), minlength=256)
                           ).pvalue > 1e-6
    # The same test sees the structure without the masks.
    plain = encode(r.updates[NAMES[0]], r.weights[NAMES[0]], r.params, np.random.default_rng(0))
    plain_bytes = np.frombuffer(plain.astype("<u4").tobytes(), dtype=np.uint8)
    assert stats.chisquare(np.bincount(plain_bytes, minlength=256)).pvalue < 1e-12


def test_mask_expansion_is_deterministic_uniform_and_bound_to_its_context():
    seed = bytes(range(32))
    a = crypto.expand(seed, 10_000, 32, 1, "pair")
    assert np.array_equal(a, crypto.expand(seed, 10_000, 32, 1, "pair"))
    assert not np.array_equal(a, crypto.expand(seed, 10_000, 32, 2, "pair"))
    assert not np.array_equal(a, crypto.expand(seed, 10_000, 32, 1, "self/x"))
    # Uniform over the whole range, top value included (Flower's randint(0, range - 1) never draws it).
    small = crypto.expand(seed, 100_000, 16, 1, "pair")
    assert small.max() == 2**16 - 1 and small.min() == 0
    assert stats.chisquare(np.bincount(small.astype(np.int64) >> 8, minlength=256)).pvalue > 1e-6


# lying devices -------------------------------------------------------------------

def _tamper_share(r, dealer, recipient, mutate):
    """Let ``dealer`` send ``recipient`` a share changed by ``mutate(share_dict, dealt_message)``."""
    directory = KeyDirectory.from_bytes(r.server.request(dealer).to_bytes())
    msg = r.devices[dealer].share_keys(directory)
    shares = dict(msg.shares)
    mutate(shares, msg)
    r.server.receive(dealer, ShareKeys(round=msg.round, device=dealer, commitment=msg.commitment,
                                       shares=shares))


def test_share_that_fails_authentication_is_refused_naming_the_dealer_and_the_round_goes_on():
    r = Round()
    r.advertise()
    dealer = r.params.order[0]
    victim, other = r.params.order[1], r.params.order[2]

    def flip(shares, msg):
        seed_share, key_share = shares[victim]
        shares[victim] = (seed_share[:-1] + bytes([seed_share[-1] ^ 1]), key_share)  # a wrong tag

    def misroute(shares, msg):
        shares[other] = shares[victim]  # a share encrypted for someone else

    _tamper_share(r, dealer, victim, flip)
    for n in sorted(r.server.expected()):
        directory = KeyDirectory.from_bytes(r.server.request(n).to_bytes())
        r.server.receive(n, r.devices[n].share_keys(directory))
    r.server.close_stage()
    r.masked()
    [refusal] = r.devices[victim].refused
    assert isinstance(refusal, ShareAuthenticationError)
    assert refusal.device == dealer and dealer in refusal.message
    result = r.check(r.unmask())
    assert result.complaints == {victim: (dealer,)}

    r2 = Round(seed=1)
    r2.advertise()
    dealer = r2.params.order[0]
    victim, other = r2.params.order[1], r2.params.order[2]
    _tamper_share(r2, dealer, other, misroute)
    r2.share()
    r2.masked()
    assert [e.device for e in r2.devices[other].refused] == [dealer]
    assert r2.check(r2.unmask()).complaints == {other: (dealer,)}


def test_replayed_messages_are_refused_naming_the_device_and_the_round_goes_on():
    old = Round(NAMES[:5], shares=5, threshold=3, seed=4, number=ROUND - 1)
    old_keys = {n: d.advertise() for n, d in old.devices.items()}
    old.server.receive(NAMES[0], old_keys[NAMES[0]])
    r = Round(NAMES[:5], shares=5, threshold=3, seed=5, previous_keys=old.server.public_keys())
    # A message from an earlier round.
    with pytest.raises(StaleMessage) as err:
        r.server.receive_bytes(NAMES[0], old_keys[NAMES[0]].to_bytes())
    assert err.value.device == NAMES[0] and err.value.field == "round"
    # The earlier round's keys, relabelled for this round.
    replay = AdvertiseKeys(round=ROUND, device=NAMES[0], cipher_key=old_keys[NAMES[0]].cipher_key,
                           mask_key=old_keys[NAMES[0]].mask_key)
    with pytest.raises(ProtocolViolation, match="earlier round"):
        r.server.receive(NAMES[0], replay)
    r.advertise()
    # A message from an earlier stage of this round.
    with pytest.raises(StaleMessage) as err:
        r.server.receive(NAMES[1], r.advertised[NAMES[1]])
    assert err.value.device == NAMES[1] and err.value.field == "stage"
    r.share()
    # The same masked input twice is counted once; a different one is refused.
    first = r.masked_input(NAMES[2])
    r.server.receive_bytes(NAMES[2], first.to_bytes(r.params))
    r.server.receive_bytes(NAMES[2], first.to_bytes(r.params))
    r.sent_masked.add(NAMES[2])
    other = MaskedInput(round=ROUND, device=NAMES[2], vector=first.vector ^ np.uint64(1))
    with pytest.raises(StaleMessage, match="already sent different"):
        r.server.receive(NAMES[2], other)
    r.masked()
    r.check(r.unmask())


def test_messages_in_another_devices_name_or_with_its_key_are_refused():
    r = Round(NAMES[:5], shares=5, threshold=3)
    a, b = NAMES[0], NAMES[1]
    b_keys = r.devices[b].advertise()
    r.server.receive(b, b_keys)
    with pytest.raises(ProtocolViolation) as err:  # a speaks as b
        r.server.receive(a, b_keys)
    assert err.value.device == a and err.value.field == "device"
    stolen = AdvertiseKeys(round=ROUND, device=a, cipher_key=b_keys.cipher_key,
                           mask_key=r.devices[a].mask_key)
    with pytest.raises(ProtocolViolation, match=f"key of device '{b}'") as err:
        r.server.receive(a, stolen)
    assert err.value.device == a
    with pytest.raises(ProtocolViolation, match="not selected"):
        r.server.receive("stranger", AdvertiseKeys(round=ROUND, device="stranger",
                                                   cipher_key=r.devices[a].cipher_key,
                                                   mask_key=r.devices[a].mask_key))
    for n in NAMES[2:5]:
        r.server.receive(n, r.devices[n].advertise())
    r.server.receive(a, r.devices[a].advertise())  # the refusals changed nothing: a still joins
    r.server.close_stage()
    r.share()
    r.masked()
    r.check(r.unmask())


def test_a_wrong_revealed_key_is_refused_naming_the_revealer_and_the_others_unmask():
    r = Round()
    r.advertise()
    r.share()
    r.masked()
    liar = r.params.order[4]
    request = UnmaskRequest.from_bytes(r.server.request(liar).to_bytes())
    honest = r.devices[liar].unmask(request)
    owner = sorted(honest.seed_keys)[0]
    lie = UnmaskResponse(round=ROUND, device=liar, mask_keys=honest.mask_keys,
                         seed_keys={**honest.seed_keys, owner: bytes(32)})
    with pytest.raises(ProtocolViolation) as err:
        r.server.receive(liar, lie)
    assert err.value.device == liar and owner in err.value.message
    asked_too_much = UnmaskResponse(round=ROUND, device=liar, seed_keys=honest.seed_keys,
                                    mask_keys={owner: honest.seed_keys[owner]})
    with pytest.raises(ProtocolViolation, match="not asked for"):
        r.server.receive(liar, asked_too_much)
    assert liar in r.server.expected()  # nothing of the refused answers was kept
    r.check(r.unmask(drop={liar}))


def test_a_dealer_of_an_inconsistent_share_is_named_and_the_seed_still_rebuilt():
    r = Round()
    r.advertise()
    # The victim holds share 1, which is in the first subset the server tries.
    dealer, victim = next((d, min(r.params.neighbours(d))) for d in NAMES if min(r.params.neighbours(d)) != d)
    cheat = r.devices[dealer]

    def garble(shares, msg):
        # A share that authenticates (the dealer encrypts it properly) but lies about the seed.
        kind = crypto.SEED
        key = crypto.share_key(cheat._cipher_private, r.devices[victim].cipher_key, ROUND, dealer,
                               victim, kind)
        ad = crypto.share_associated_data(ROUND, dealer, victim, kind)
        index, _ = crypto.parse_share_plaintext(crypto.open_sealed(key, shares[victim][0], ad))
        forged = crypto.seal(key, crypto.share_plaintext(index, bytes(32)), ad)
        shares[victim] = (forged, shares[victim][1])

    _tamper_share(r, dealer, victim, garble)
    r.share()
    r.masked()
    result = r.check(r.unmask())
    [violation] = result.violations
    assert violation.device == dealer and "inconsistent" in violation.message


def test_device_refuses_a_server_that_lies():
    r = Round(NAMES[:5], shares=5, threshold=3)
    r.advertise()
    me = NAMES[0]
    directory = KeyDirectory.from_bytes(r.server.request(me).to_bytes())
    keys = dict(directory.keys)
    other = next(n for n in keys if n != me)
    swapped = KeyDirectory(round=ROUND, keys={**keys, me: keys[other]})
    with pytest.raises(ProtocolViolation, match="own keys"):
        r.devices[me].share_keys(swapped)
    duplicated = KeyDirectory(round=ROUND, keys={**keys, other: (keys[me][0], keys[other][1])})
    with pytest.raises(ProtocolViolation, match="same key"):
        r.devices[me].share_keys(duplicated)
    with pytest.raises(StaleMessage, match="round"):
        r.devices[me].share_keys(KeyDirectory(round=ROUND + 1, keys=keys))
    r.share()
    r.masked()
    request = UnmaskRequest.from_bytes(r.server.request(me).to_bytes())
    both = UnmaskRequest(round=ROUND, survivors=request.survivors, dropped=(request.survivors[-1],))
    with pytest.raises(ProtocolViolation, match="survivor and dropped"):
        r.devices[me].unmask(both)
    r.devices[me].unmask(request)
    with pytest.raises(StaleMessage):  # never a second answer, which could reveal the other secret
        r.devices[me].unmask(request)


# messages and settings -----------------------------------------------------------

def test_every_message_round_trips_through_bytes_and_json_without_pickle():
    r = Round(NAMES[:5], shares=5, threshold=3)
    stages = []

    def trip(msg):
        body = msg.to_bytes()
        stages.append(json.loads(body)["stage"])  # plain JSON
        assert type(msg).from_bytes(body) == msg
        return msg

    trip(r.params)
    for n, d in r.devices.items():
        r.server.receive(n, trip(d.advertise()))
    r.server.close_stage()
    for n, d in r.devices.items():
        r.server.receive(n, trip(d.share_keys(trip(r.server.request(n)))))
    r.server.close_stage()
    for n, d in r.devices.items():
        msg = d.masked_input(trip(r.server.request(n)), r.updates[n], r.weights[n])
        body = msg.to_bytes(r.params)
        assert wire.header(body)["masked"]["dtype"] == "U32"  # safetensors
        back = MaskedInput.from_bytes(body, r.params, n)
        assert np.array_equal(back.vector, msg.vector) and back.refused == msg.refused
        r.server.receive(n, back)
        r.sent_masked.add(n)
    r.server.close_stage()
    for n, d in r.devices.items():
        r.server.receive(n, trip(d.unmask(trip(r.server.request(n)))))
    r.check(r.server.finish())
    assert set(stages) == {"setup", "advertise", "keys", "share", "shares", "unmask_request", "unmask"}


@pytest.mark.parametrize(("body", "field"), [
    (b"not json", "body"),
    (b"[1]", "body"),  # not JSON object: read as safetensors, which it is not either
    (b'{"stage": "advertise", "round": 7, "device": "dev-0", "cipher_key": "AAAA", "mask_key": "AAAA"}',
     "cipher_key"),
    (b'{"stage": "advertise", "round": 7, "device": "dev-0", "cipher_key": "!!", "mask_key": "x", "z": 1}',
     "z"),
    (b'{"stage": "advertise", "round": true, "device": "dev-0", "cipher_key": "", "mask_key": ""}', "round"),
    (b'{"stage": "advertise", "round": 7, "device": "../etc", "cipher_key": "", "mask_key": ""}', "device"),
    (b'{"stage": "unmask", "round": 7, "device": "dev-0", "seed_keys": {"a": 1}, "mask_keys": {}}',
     "seed_keys"),
    (b'{"stage": "pickle", "round": 7}', "stage"),
    (b'{"stage": "advertise", "round": 1' + b"0" * 5000 + b"}", "body"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "masked"),
])
def test_malformed_messages_are_refused_naming_the_field_and_the_device(body, field):
    r = Round(NAMES[:3], shares=3, threshold=2)
    with pytest.raises(ProtocolViolation) as err:
        r.server.receive_bytes("dev-0", body)
    assert err.value.field == field, err.value.message
    assert err.value.device == "dev-0"
    assert err.value.to_dict()["device"] == "dev-0"
    assert r.server.expected() == set(NAMES[:3])


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="odd"):
        SecAggConfig(shares=4).validate()
    with pytest.raises(ConfigError, match="more than half"):
        SecAggConfig(shares=5, threshold=2).validate()
    with pytest.raises(ConfigError, match="at least 3"):
        SecAggConfig(shares=5, threshold=3).for_round(1, NAMES[:2], 10)
    with pytest.raises(ConfigError, match=r"fewer devices per round \(at most"):
        SecAggConfig(bits=32, max_weight=100_000_000).for_round(1, NAMES, 10)
    assert SecAggConfig(bits=32, max_weight=10_000).max_devices() == 13421
    params = SecAggConfig(shares=3, threshold=2).for_round(1, NAMES[:3], 10)
    too_fine = {**params.to_dict(), "levels": params.levels + 1}
    with pytest.raises(ProtocolViolation, match="overflow"):
        RoundParams.from_dict(too_fine)  # a device refuses a server that would overflow the field
    with pytest.raises(ValueError, match="weight"):
        encode(np.zeros(10), 0, params, np.random.default_rng(0))


def test_stochastic_rounding_is_unbiased():
    values = np.full(200_000, 0.3)
    q = quantize(values, 1.0, 10, np.random.default_rng(1))  # 3.0 steps exactly: always 3
    assert set(np.unique(q)) == {3}
    q = quantize(np.full(200_000, 0.325), 1.0, 10, np.random.default_rng(1))
    assert set(np.unique(q)) == {3, 4}
    assert abs(q.mean() - 3.25) < 0.01


# quantized uploads (--compression q8 / q4 with secure aggregation) -----------------------

@pytest.mark.parametrize("quantization, levels", [(8, 127), (4, 7)])
def test_a_quantized_round_sums_exactly_in_the_smallest_field_that_holds_it(quantization, levels):
    """Each device quantizes to 8 (4) bits; the field is bit_length(N x max_weight x levels) + 1
    bits, and the mean is the NumPy reference's exactly, through a dropout recovered from shares."""
    r = Round(NAMES[:6], length=400, max_weight=1000, quantization=quantization)
    p = r.params
    assert (p.levels, p.quantization, p.packed) == (levels, quantization, True)
    assert p.bits == field_bits(6, 1000, levels) == (6 * 1000 * levels).bit_length() + 1
    assert 6 * 1000 * levels <= 2 ** (p.bits - 1) - 1 < 2 * 6 * 1000 * levels  # no smaller field holds it
    result = r.check(r.run(masked=r.at(2)))  # exact to the NumPy reference; within a step of the clipped mean
    assert result.bits == p.bits and result.quantization == quantization and result.recovered


def test_the_largest_quantized_sum_does_not_overflow_the_small_field():
    """Every device at the clip bound with the largest weight: the sum is N x max_weight x levels,
    the field's largest positive value range, and decodes to the bound exactly (either sign)."""
    for sign in (1, -1):
        r = Round(NAMES[:5], length=64, max_weight=37, quantization=8, clip=0.5)
        r.updates = {n: np.full(64, sign * 3.0) for n in r.devices}  # far past the clip range
        r.weights = {n: 37 for n in r.devices}
        result = r.run()
        np.testing.assert_array_equal(result.mean, np.full(64, sign * 0.5))
        assert result.total_weight == 5 * 37


def test_a_quantized_upload_is_its_field_bits_per_value_and_looks_uniform():
    """The masked input travels bit-packed: (length + 1) x bits / 8 bytes, against 4 bytes a value
    unquantized; unpacked, its values are uniform over the field (Kolmogorov-Smirnov)."""
    length = 20_000
    sizes = {}
    for quantization in (0, 8, 4):
        r = Round(NAMES[:4], length=length, shares=3, threshold=2, max_weight=100, quantization=quantization)
        r.advertise()
        r.share()
        masked = r.masked_input(NAMES[0])
        body = masked.to_bytes(r.params)
        header = wire.header(body)["masked"]
        data_bytes = header["data_offsets"][1] - header["data_offsets"][0]
        sizes[quantization] = (r.params.bits, data_bytes, header["dtype"])
        back = MaskedInput.from_bytes(body, r.params, NAMES[0])
        np.testing.assert_array_equal(back.vector, masked.vector)
        if quantization:
            assert stats.kstest(masked.vector / 2.0 ** r.params.bits, "uniform").pvalue > 1e-6
    assert sizes[0] == (32, 4 * (length + 1), "U32")
    # 4 devices x weight 100 x 127 = 50,800 < 2^16: 17 bits; x 7 = 2,800 < 2^12: 13 bits.
    assert sizes[8] == (17, packed_size(length + 1, 17), "U8")
    assert sizes[4] == (13, packed_size(length + 1, 13), "U8")


@pytest.mark.parametrize("bits", [2, 5, 13, 17, 31, 32, 33, 64])
def test_packing_round_trips_and_refuses_extra_bytes_or_padding(bits):
    rng = np.random.default_rng(bits)
    for count in (1, 7, 8, 9, 70_001):
        values = rng.integers(0, 2**bits - 1, count, dtype=np.uint64, endpoint=True)
        data = pack(values, bits)
        assert data.size == packed_size(count, bits) == -(-count * bits // 8)
        np.testing.assert_array_equal(unpack(data, count, bits), values)
    with pytest.raises(ValueError, match="take"):
        unpack(np.zeros(packed_size(9, bits) + 1, np.uint8), 9, bits)
    if (9 * bits) % 8:
        padded = pack(np.zeros(9, np.uint64), bits)
        padded[-1] = 0x80
        with pytest.raises(ValueError, match="padding"):
            unpack(padded, 9, bits)


def test_quantized_round_parameters_that_could_overflow_or_mislead_are_refused():
    params = SecAggConfig(shares=3, threshold=2, max_weight=100).quantized(8).for_round(1, NAMES[:3], 10)
    assert RoundParams.from_bytes(params.to_bytes()) == params
    assert params.to_dict()["quantization"] == 8
    plain = SecAggConfig(shares=3, threshold=2).for_round(1, NAMES[:3], 10)
    assert "quantization" not in plain.to_dict()  # a plain round reads as before
    for change, match in (({"bits": params.bits - 1}, "overflow"), ({"levels": 100}, "127 levels"),
                          ({"quantization": 5}, "quantization"), ({"quantization": 0}, "quantization")):
        with pytest.raises(ProtocolViolation, match=match):
            RoundParams.from_dict({**params.to_dict(), **change})
    q4 = SecAggConfig(shares=3, threshold=2, max_weight=100).quantized(4).for_round(1, NAMES[:3], 10)
    unquantized = {k: v for k, v in q4.to_dict().items() if k != "quantization"}
    with pytest.raises(ProtocolViolation, match="from 16"):  # 13 bits, read as words
        RoundParams.from_dict(unquantized)
    from fedhub.engine.secagg.codec import MAX_DEVICES
    from fedhub.engine.secagg.params import MAX_BITS, MAX_WEIGHT

    assert field_bits(MAX_DEVICES, MAX_WEIGHT, 127) <= MAX_BITS  # no round's field can outgrow 64 bits
    with pytest.raises(ConfigError, match="quantization"):
        SecAggConfig().quantized(6).validate()
    # A masked input of the wrong size for the packed field, or with stray padding, is refused.
    r = Round(NAMES[:3], length=10, shares=3, threshold=2, max_weight=100, quantization=8)
    r.advertise()
    r.share()
    masked = r.masked_input(NAMES[0])
    as_words = masked.to_bytes(dataclasses.replace(r.params, quantization=0, bits=32))
    with pytest.raises(ProtocolViolation, match="masked"):
        MaskedInput.from_bytes(as_words, r.params, NAMES[0])
    body = masked.to_bytes(r.params)
    assert (11 * r.params.bits) % 8  # the last byte has spare bits
    data = pack(masked.vector, r.params.bits)
    data[-1] |= 0x80
    stray = st_save({"masked": data}, metadata=wire.header(body)["__metadata__"])
    with pytest.raises(ProtocolViolation, match="padding"):
        MaskedInput.from_bytes(stray, r.params, NAMES[0])
    assert np.array_equal(MaskedInput.from_bytes(body, r.params, NAMES[0]).vector, masked.vector)


def _masked_bytes(rnd, n):
    """Device ``n``'s masked input (a device masks its update once)."""
    made = rnd.__dict__.setdefault("made", {})
    if n not in made:
        made[n] = rnd.masked_input(n).to_bytes(rnd.params)
    return made[n]


def _relay_sum(rnd, names, *, tokens=None):
    """What a relay sends for ``names``: their masked inputs summed in the round's field."""
    from fedhub.engine.secagg import MaskedSum, masks

    total = np.zeros(rnd.params.length + 1, dtype=np.uint64)
    inputs = []
    for n in sorted(names):
        message = MaskedInput.from_bytes(_masked_bytes(rnd, n), rnd.params, n)
        masks.add(total, message.vector, 1, rnd.params)
        inputs.append((n, message.refused))
    return MaskedSum(rnd.params.round, tuple(inputs), total, tuple(tokens or [f"tok-{n}" for n, _ in inputs]))


@pytest.mark.parametrize("quantization", [0, 8])
def test_a_relays_masked_sum_counts_as_each_of_its_devices_masked_inputs(quantization):
    """Two relays' sums and one device of its own: the same mean as every device's own input,
    through a dropout; the same sum again is a retry, a sum naming a device already in is refused."""
    from fedhub.engine.secagg import MaskedSum

    rnd = Round(quantization=quantization)
    rnd.advertise()
    rnd.share()
    dropped = rnd.at(9)
    first, second = sorted(set(NAMES[:5]) - dropped), sorted(set(NAMES[5:9]) - dropped)
    body = _relay_sum(rnd, first).to_bytes(rnd.params)
    sent = MaskedSum.from_bytes(body, rnd.params, "edge")
    assert sent.devices == tuple(first) and sent.tokens == tuple(f"tok-{n}" for n in first)
    assert rnd.server.receive_sum(sent) is False
    assert rnd.server.receive_sum(MaskedSum.from_bytes(body, rnd.params)) is True  # a retry
    overlapping = _relay_sum(rnd, [first[0], second[0]])
    with pytest.raises(StaleMessage) as refused:
        rnd.server.receive_sum(overlapping)
    assert refused.value.device == first[0]
    assert second[0] not in rnd.server._masked  # refused whole: nothing of it counted
    rnd.server.receive_sum(_relay_sum(rnd, second[1:]))
    rest = sorted(set(NAMES) - set(first) - set(second[1:]) - dropped)
    for n in rest:
        rnd.server.receive_bytes(n, _masked_bytes(rnd, n))
    rnd.sent_masked = set(NAMES) - dropped
    assert rnd.server.close_stage() == "unmask"
    rnd.check(rnd.unmask())


def test_a_masked_sum_is_refused_naming_the_field_and_changes_nothing():
    from fedhub.engine.secagg import MaskedSum

    rnd = Round()
    rnd.advertise()
    rnd.share()
    good = _relay_sum(rnd, NAMES[:3])
    meta = {"format": crypto.PROTOCOL, "stage": "masked_sum", "round": str(ROUND)}
    vector = np.zeros(rnd.params.length + 1, dtype="<u4")
    entry = {"name": NAMES[0], "refused": [], "token": "t"}

    def body(devices=(entry,), tensor=vector, **more):
        devices_json = devices if isinstance(devices, str) else json.dumps(list(devices))
        return st_save({"masked": tensor}, metadata={**meta, "devices": devices_json, **more})

    cases = {
        "format": body(format="fedhub-secagg/0"),
        "stage": st_save({"masked": vector}, metadata={**meta, "stage": "masked", "devices": "[]"}),
        "round": body(round="seven"),
        "devices": body(devices="[]"),
        "devices[0]": body(devices=[{"name": NAMES[0], "refused": []}]),
        "devices[0].name": body(devices=[{**entry, "name": "../etc"}]),
        "devices[0].token": body(devices=[{**entry, "token": ""}]),
        "devices[0].refused": body(devices=[{**entry, "refused": ["x"] * 50}]),
        "masked": body(tensor=np.zeros(rnd.params.length + 1, dtype="<u8")),
        "extra": body(extra="1"),
    }
    cases["devices "] = body(devices=[entry, entry])
    for field, raw in cases.items():
        with pytest.raises(ProtocolViolation) as refused:
            MaskedSum.from_bytes(raw, rnd.params, "edge")
        assert refused.value.field == field.strip() or (field == "masked" and refused.value.field), field
        assert "relay 'edge'" in refused.value.message, refused.value.message
    with pytest.raises(ProtocolViolation) as refused:  # a device that is not in the round
        rnd.server.receive_sum(MaskedSum(ROUND, (("stranger", ()),), good.vector, ("t",)))
    assert refused.value.field == "devices[0].name"
    with pytest.raises(StaleMessage):  # another round's sum
        rnd.server.receive_sum(dataclasses.replace(good, round=ROUND + 1))
    assert rnd.server.expected() == set(NAMES)  # nothing counted
    rnd.server.receive_sum(good)
    assert rnd.server.expected() == set(NAMES[3:])
