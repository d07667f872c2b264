"""The server's side of one SecAgg+ round: relay keys and shares, sum masked inputs, unmask.

The server never holds an individual update in the clear: masked inputs are folded into one
running sum modulo 2^bits as they arrive (O(model) memory), and what it learns at the end is
the sum. The coordinator drives it with five calls and never reaches inside:

- :meth:`ServerRound.request` -- what a device should receive at the open stage;
- :meth:`ServerRound.receive` (or :meth:`~ServerRound.receive_bytes`) -- a device's answer;
  a refused message raises a :class:`~.errors.SecAggError` naming the device and changes nothing
  (:meth:`ServerRound.receive_sum`: a relay's sum of its devices' masked inputs, as each one's);
- :meth:`ServerRound.expected` -- who the open stage still waits for;
- :meth:`ServerRound.close_stage` -- when all answered or the stage's deadline passed;
- :meth:`ServerRound.finish` -- after the unmask stage: the weighted mean, or
  :class:`~.errors.RoundFailed` (too few survivors, a secret that cannot be rebuilt), after
  which the coordinator discards the round and runs it again with whoever is there.

Rounds are not persisted: after a restart the round runs again with fresh keys and seeds.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import crypto, masks
from .codec import loads
from .encoding import Spec, Weights, decode, unflatten
from .errors import (
    ProtocolViolation,
    ReconstructionFailed,
    RoundFailed,
    SecAggError,
    StaleMessage,
    TooFewSurvivors,
)
from .messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskedSum,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    max_json_bytes,
)
from .params import RoundParams

ADVERTISE, SHARE, MASKED, UNMASK, DONE, FAILED = "advertise", "share", "masked", "unmask", "done", "failed"
UNMASKING = "unmasking"  # finish() is rebuilding the masks
STAGES = (ADVERTISE, SHARE, MASKED, UNMASK, DONE)
# Subsets of revealed shares tried when a dealer's shares are inconsistent, before giving up.
MAX_RECONSTRUCTION_ATTEMPTS = 256
_MESSAGES = {ADVERTISE: AdvertiseKeys, SHARE: ShareKeys, UNMASK: UnmaskResponse}


@dataclass(frozen=True)
class SecAggResult:
    """What one round of secure aggregation yields: the mean, and who took part how."""

    round: int
    mean: np.ndarray  # the sample-weighted mean of the survivors' vectors (float64)
    total_weight: int
    survivors: tuple[str, ...]  # devices whose input is in the sum
    recovered: tuple[str, ...]  # dealt shares, then dropped: their masks rebuilt and removed
    dropped: tuple[str, ...]  # selected, but dropped before dealing shares
    threshold: int
    shares: int
    complaints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device -> refused dealers
    violations: tuple[ProtocolViolation, ...] = ()  # dealers found lying while unmasking
    bits: int = 0  # the field the sum was taken in
    quantization: int = 0  # bits a coordinate was quantized to (0: as finely as the field allowed)

    def weights(self, spec: Spec) -> Weights:
        """The mean as tensors of ``spec`` (name -> (shape, dtype))."""
        return unflatten(self.mean, spec)

    def metrics(self) -> dict[str, Any]:
        return {"secure_aggregation": True, "secagg_threshold": self.threshold,
                "secagg_shares": self.shares, "secagg_survivors": len(self.survivors),
                "secagg_recovered": len(self.recovered), "secagg_dropped": len(self.dropped),
                "secagg_total_weight": self.total_weight, "secagg_bits": self.bits}


class ServerRound:
    """The server's state for one round. Thread-safe: request threads call it concurrently."""

    def __init__(self, params: RoundParams, *, previous_keys: Collection[bytes] = ()) -> None:
        """``previous_keys``: public keys seen in earlier rounds, refused if a device reuses one."""
        params.validate()
        self.params = params
        self._previous = frozenset(previous_keys)
        self._lock = threading.Lock()
        self._stage = ADVERTISE
        self._failure: str | None = None
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._owners: dict[bytes, str] = {}
        self._dealt: dict[str, ShareKeys] = {}
        self._masked: dict[str, bytes] = {}  # device -> digest of its input (repeats are not re-added)
        self._complaints: dict[str, tuple[str, ...]] = {}
        self._unmasked: dict[str, UnmaskResponse] = {}
        self._revealed: dict[tuple[str, str], dict[str, tuple[int, bytes]]] = {}
        self._violations: list[ProtocolViolation] = []
        self._u1: frozenset[str] = frozenset()
        self._u2: frozenset[str] = frozenset()
        self._u3: frozenset[str] = frozenset()
        self._sum = np.zeros(params.length + 1, dtype=np.uint64)

    # reading ----------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self._stage

    def expected(self) -> frozenset[str]:
        """The devices the open stage still waits for."""
        with self._lock:
            waiting = {ADVERTISE: (frozenset(self.params.order), self._keys),
                       SHARE: (self._u1, self._dealt), MASKED: (self._u2, self._masked),
                       UNMASK: (self._u3, self._unmasked)}.get(self._stage)
            return frozenset() if waiting is None else waiting[0] - set(waiting[1])

    def public_keys(self) -> frozenset[bytes]:
        """Every public key advertised this round, for the next rounds' ``previous_keys``."""
        with self._lock:
            return frozenset(self._owners)

    def request(self, device: str) -> RoundParams | KeyDirectory | ShareBundle | UnmaskRequest:
        """What ``device`` must receive at the open stage."""
        with self._lock:
            self._check_open()
            p = self.params
            if self._stage == ADVERTISE:
                self._require(device, frozenset(p.order), "it was not selected")
                return p
            if self._stage == SHARE:
                self._require(device, self._u1, "its keys came too late, or too few neighbours "
                              "advertised theirs")
                near = self._near(device, self._u1)
                return KeyDirectory(round=p.round, keys={n: self._keys[n] for n in near})
            if self._stage == MASKED:
                self._require(device, self._u2, "its shares came too late, or too few neighbours "
                              "dealt theirs")
                return ShareBundle(round=p.round, shares={
                    n: self._dealt[n].shares[device] for n in self._near(device, self._u2)})
            self._require(device, self._u3, "its masked input came too late")
            near = self.params.neighbours(device)
            return UnmaskRequest(round=p.round, survivors=tuple(sorted(near & self._u3)),
                                 dropped=tuple(sorted(near & (self._u2 - self._u3))))

    # receiving --------------------------------------------------------------
    def receive_bytes(self, device: str, body: bytes) -> None:
        """Parse a device's message (JSON, or safetensors for a masked input) and receive it."""
        if body[:1] == b"{":
            raw = loads(body, device, max_bytes=max_json_bytes(self.params))
            cls = _MESSAGES.get(raw.get("stage")) if isinstance(raw, dict) else None
            if cls is None:
                raise ProtocolViolation(f"device {device!r} sent a message of unknown stage", "stage",
                                        device=device)
            self.receive(device, cls.from_dict(raw, device))
        else:
            self.receive(device, MaskedInput.from_bytes(body, self.params, device))

    def receive(self, device: str,
                message: AdvertiseKeys | ShareKeys | MaskedInput | UnmaskResponse) -> None:
        """Take one message from ``device`` (as authenticated by the transport)."""
        handler = {AdvertiseKeys: (ADVERTISE, self._advertise), ShareKeys: (SHARE, self._share),
                   MaskedInput: (MASKED, self._masked_input), UnmaskResponse: (UNMASK, self._unmask)}
        stage, take = handler[type(message)]
        with self._lock:
            self._check_sender(device, message, stage)
            take(device, message)

    def _advertise(self, device: str, msg: AdvertiseKeys) -> None:
        pair = (msg.cipher_key, msg.mask_key)
        if device in self._keys:
            self._repeat(device, self._keys[device] == pair, "keys")
            return
        if msg.cipher_key == msg.mask_key:
            raise self._violation(device, "advertises one key for both purposes", "mask_key")
        for key, field_name in zip(pair, ("cipher_key", "mask_key"), strict=True):
            owner = self._owners.get(key)
            if owner is not None:
                raise self._violation(device, f"advertises the key of device {owner!r}", field_name)
            if key in self._previous:
                raise self._violation(device, "advertises a key from an earlier round", field_name)
            try:
                crypto.check_public_key(key)
            except crypto.CryptoFailure as exc:
                raise self._violation(device, str(exc), field_name) from None
        self._keys[device] = pair
        self._owners.update({msg.cipher_key: device, msg.mask_key: device})

    def _share(self, device: str, msg: ShareKeys) -> None:
        self._require(device, self._u1, "its keys came too late, or too few neighbours advertised theirs")
        if device in self._dealt:
            self._repeat(device, self._dealt[device] == msg, "shares")
            return
        holders = self._near(device, self._u1)
        if set(msg.shares) != holders:
            missing = sorted(holders - set(msg.shares))
            extra = sorted(set(msg.shares) - holders)
            raise self._violation(device, f"must deal shares to exactly {sorted(holders)}: "
                                  + (f"missing {missing[0]!r}" if missing else f"{extra[0]!r} is not one"),
                                  "shares")
        self._dealt[device] = msg

    def _masked_input(self, device: str, msg: MaskedInput) -> None:
        self._take_masked(((device, msg.refused),), msg.vector)

    def receive_sum(self, msg: MaskedSum) -> bool:
        """Take a relay's sum of its devices' masked inputs (each device as authenticated by the
        transport): as if each had sent its own. True when it is the same sum again (a retry);
        a refusal names the device at fault and changes nothing."""
        with self._lock:
            p = self.params
            for i, name in enumerate(msg.devices):
                if name not in p.order:
                    raise self._violation(name, f"was not selected for round {p.round}", f"devices[{i}].name")
            if msg.round != p.round:
                raise StaleMessage(f"a masked sum for round {msg.round} during round {p.round}: replayed "
                                   "or stale", "round")
            if all(self._masked.get(d) == _digest(msg.inputs, msg.vector) for d in msg.devices):
                return True  # a retry, also once the stage has moved on
            self._check_open()
            if self._stage != MASKED:
                raise StaleMessage(f"a masked sum while round {p.round} is at stage {self._stage!r}: "
                                   "replayed or late", "stage")
            return self._take_masked(msg.inputs, msg.vector)

    def _take_masked(self, inputs: tuple[tuple[str, tuple[str, ...]], ...], vector: np.ndarray) -> bool:
        """Add ``vector``, the masked input of the devices in ``inputs`` (each with the dealers it
        refused), once (lock held). True for a repeat of the same (a retried upload)."""
        digest = _digest(inputs, vector)
        known = [device for device, _ in inputs if device in self._masked]
        if known:
            self._repeat(known[0], all(self._masked.get(d) == digest for d, _ in inputs), "masked input")
            return True
        for device, refused in inputs:
            self._require(device, self._u2, "its shares came too late, or too few neighbours dealt theirs")
            strangers = sorted(set(refused) - self._near(device, self._u2))
            if strangers:
                raise self._violation(device, f"refuses shares of {strangers[0]!r}, which dealt none to it",
                                      "refused")
        masks.add(self._sum, vector, 1, self.params)
        for device, refused in inputs:
            self._masked[device] = digest
            if refused:
                self._complaints[device] = tuple(sorted(refused))
        return False

    def _unmask(self, device: str, msg: UnmaskResponse) -> None:
        self._require(device, self._u3, "its masked input came too late")
        if device in self._unmasked:
            self._repeat(device, self._unmasked[device] == msg, "unmask answer")
            return
        near = self.params.neighbours(device)
        allowed = {crypto.SEED: near & self._u3, crypto.MASK_KEY: near & (self._u2 - self._u3)}
        opened: list[tuple[str, str, int, bytes]] = []
        for kind, keys, field_name in ((crypto.SEED, msg.seed_keys, "seed_keys"),
                                       (crypto.MASK_KEY, msg.mask_keys, "mask_keys")):
            for owner, key in sorted(keys.items()):
                if owner not in allowed[kind]:
                    raise self._violation(device, f"reveals a {kind} share of {owner!r}, which was not "
                                          "asked for", field_name)
                sealed = self._dealt[owner].shares[device][crypto.KINDS.index(kind)]
                try:
                    index, share = crypto.parse_share_plaintext(crypto.open_sealed(
                        key, sealed, crypto.share_associated_data(self.params.round, owner, device, kind)))
                except crypto.CryptoFailure:
                    raise self._violation(device, f"reveals a key that does not open {owner!r}'s {kind} "
                                          "share", field_name) from None
                opened.append((owner, kind, index, share))
        self._unmasked[device] = msg
        for owner, kind, index, share in opened:
            if index != sorted(self._near(owner, self._u1)).index(device) + 1:
                self._violations.append(self._violation(owner, f"dealt {device!r} a {kind} share of the "
                                                        "wrong index", "shares"))
                continue
            self._revealed.setdefault((owner, kind), {})[device] = (index, share)

    # stages -----------------------------------------------------------------
    def close_stage(self) -> str:
        """Close the open stage (everyone answered, or its deadline passed) and open the next;
        returns the new stage. Raises :class:`TooFewSurvivors` if the round cannot go on."""
        with self._lock:
            self._check_open()
            if self._stage == UNMASK:
                raise StaleMessage("the unmask stage closes with finish()", "stage")
            try:
                if self._stage == ADVERTISE:
                    self._u1 = self._viable(set(self._keys), "advertised keys")
                elif self._stage == SHARE:
                    self._u2 = self._viable(set(self._dealt) & self._u1, "dealt shares")
                else:
                    self._u3 = frozenset(self._masked)
                    if len(self._u3) < self.params.threshold:
                        raise TooFewSurvivors(
                            f"round {self.params.round}: {len(self._u3)} devices sent masked inputs, "
                            f"at least the threshold of {self.params.threshold} needed", "threshold")
                    for owner in sorted(self._u2):
                        self._holders_left(owner, self._u3, "sent masked inputs")
            except RoundFailed as exc:
                self._fail(exc)
                raise
            self._stage = STAGES[STAGES.index(self._stage) + 1]
            return self._stage

    def finish(self) -> SecAggResult:
        """Close the unmask stage: rebuild the secrets, remove the masks, decode the mean.

        The work (a mask expansion per device) runs outside the lock; meanwhile late messages
        are refused as stale rather than kept waiting."""
        with self._lock:
            self._check_open()
            if self._stage != UNMASK:
                raise StaleMessage(f"finish() needs the unmask stage, round is at {self._stage!r}", "stage")
            self._stage = UNMASKING
        try:
            result = self._unmask_sum()
        except Exception as exc:
            with self._lock:
                self._fail(exc)
            raise
        with self._lock:
            self._stage = DONE
            self._sum = np.zeros(0, dtype=np.uint64)
        return result

    def _unmask_sum(self) -> SecAggResult:
        p = self.params
        responders = frozenset(self._unmasked)
        for owner in sorted(self._u2):
            self._holders_left(owner, responders, "answered the unmask request")
        total = self._sum.copy()
        for owner in sorted(self._u3):
            seed = self._rebuild(owner, crypto.SEED)
            masks.add(total, masks.self_mask(seed, p, owner), -1, p)
        recovered = sorted(self._u2 - self._u3)
        for owner in recovered:
            peers = sorted((self.params.neighbours(owner) & self._u3) - {owner})
            if not peers:
                continue
            private = self._rebuild(owner, crypto.MASK_KEY)
            for peer in peers:  # peer added pair_sign(peer, owner) * mask; take it away
                mask = masks.pair_mask(private, self._keys[peer][1], p, owner, peer)
                masks.add(total, mask, -masks.pair_sign(peer, owner), p)
        mean, weight = decode(total, p)
        return SecAggResult(round=p.round, mean=mean, total_weight=weight, survivors=tuple(sorted(self._u3)),
                            recovered=tuple(recovered), dropped=tuple(sorted(set(p.order) - self._u2)),
                            threshold=p.threshold, shares=p.shares, complaints=dict(self._complaints),
                            violations=tuple(self._violations), bits=p.bits, quantization=p.quantization)

    def _rebuild(self, owner: str, kind: str) -> bytes:
        """The secret from ``threshold`` revealed shares, checked against the dealer's commitment
        (seed) or advertised public key (mask key). Every revealed share is authentic, so a
        mismatch means the dealer dealt inconsistent shares: other subsets are tried."""
        shares = sorted(self._revealed.get((owner, kind), {}).values())
        for attempt, subset in enumerate(itertools.combinations(shares, self.params.threshold)):
            if attempt >= MAX_RECONSTRUCTION_ATTEMPTS:
                break
            secret = crypto.combine_shares(list(subset))
            if kind == crypto.SEED:
                ok = hmac.compare_digest(crypto.commitment(secret, self.params.round, owner),
                                         self._dealt[owner].commitment)
            else:
                ok = hmac.compare_digest(crypto.public_key_of(secret), self._keys[owner][1])
            if ok:
                if attempt:
                    self._violations.append(self._violation(owner, f"dealt inconsistent {kind} shares",
                                                            "shares"))
                return secret
        raise ReconstructionFailed(
            f"round {self.params.round}: device {owner!r}'s {kind} cannot be rebuilt from the "
            f"{len(shares)} shares revealed: it dealt inconsistent shares", "shares", device=owner)

    # internals --------------------------------------------------------------
    def _near(self, device: str, members: frozenset[str]) -> frozenset[str]:
        return self.params.neighbours(device) & members

    def _viable(self, members: set[str], what: str) -> frozenset[str]:
        """The largest subset in which every device has ``threshold`` neighbours (itself included):
        a device with fewer could not have its secrets rebuilt, so it is left out."""
        t = self.params.threshold
        while True:
            weak = {u for u in members if len(self.params.neighbours(u) & members) < t}
            if not weak:
                break
            members -= weak
        if len(members) < max(2, t):
            raise TooFewSurvivors(
                f"round {self.params.round}: {len(members)} devices {what} with enough neighbours, "
                f"at least {max(2, t)} needed for a threshold of {t}", "threshold")
        return frozenset(members)

    def _holders_left(self, owner: str, alive: frozenset[str], what: str) -> None:
        """Refuse to go on if ``owner``'s secret needed now could no longer be rebuilt."""
        near = self.params.neighbours(owner)
        if owner not in self._u3 and not (near & self._u3) - {owner}:
            return  # dropped, and none of its masks are in the sum
        holders = {h for h in near & alive if owner not in self._complaints.get(h, ())}
        if len(holders) < self.params.threshold:
            raise TooFewSurvivors(
                f"round {self.params.round}: {len(holders)} of device {owner!r}'s neighbours "
                f"{what} and hold its shares, {self.params.threshold} needed", "threshold", device=owner)

    def _check_open(self) -> None:
        if self._stage == FAILED:
            raise StaleMessage(f"round {self.params.round} failed: {self._failure}", "round")
        if self._stage == DONE:
            raise StaleMessage(f"round {self.params.round} is complete", "round")
        if self._stage == UNMASKING:
            raise StaleMessage(f"round {self.params.round} is being unmasked", "round")

    def _check_sender(self, device: str, msg: Any, stage: str) -> None:
        if msg.device != device:
            raise self._violation(device, f"sent a message in the name of device {msg.device!r}", "device")
        if device not in self.params.order:
            raise self._violation(device, f"was not selected for round {self.params.round}", "device")
        if msg.round != self.params.round:
            raise StaleMessage(f"device {device!r} sent a {stage!r} message for round {msg.round} during "
                               f"round {self.params.round}: replayed or stale", "round", device=device)
        self._check_open()
        if self._stage != stage:
            raise StaleMessage(f"device {device!r} sent a {stage!r} message while round "
                               f"{self.params.round} is at stage {self._stage!r}: replayed or late",
                               "stage", device=device)

    def _require(self, device: str, members: frozenset[str], why: str) -> None:
        if device not in members:
            raise StaleMessage(f"device {device!r} takes no part in this stage of round "
                               f"{self.params.round}: {why}", "device", device=device)

    def _repeat(self, device: str, same: bool, what: str) -> None:
        """A repeat of the same message is accepted once (a retried upload); a different one is not."""
        if not same:
            raise StaleMessage(f"device {device!r} already sent different {what} in round "
                               f"{self.params.round}", "device", device=device)

    def _violation(self, device: str, message: str, field: str) -> ProtocolViolation:
        return ProtocolViolation(f"device {device!r} {message}", field, device=device)

    def _fail(self, exc: Exception) -> None:
        self._stage = FAILED
        self._failure = exc.message if isinstance(exc, SecAggError) else f"{type(exc).__name__}: {exc}"
        self._sum = np.zeros(0, dtype=np.uint64)


def _digest(inputs: tuple[tuple[str, tuple[str, ...]], ...], vector: np.ndarray) -> bytes:
    """What tells a retried masked input (or sum) from another one."""
    return hashlib.sha256(vector.tobytes() + repr(inputs).encode()).digest()
