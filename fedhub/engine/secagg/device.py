"""The device's side of one SecAgg+ round: a state machine that answers each server message.

The device trusts nothing it receives: each request must be for its round and the expected
stage, name only its neighbours, and show its own keys unchanged. It reveals, for each
neighbour, at most one of the two secrets (the seed share if the neighbour survived, the
mask-key share if it dropped), never both, and answers the unmask request only once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from . import crypto, masks
from .encoding import encode, flatten
from .errors import ProtocolViolation, ShareAuthenticationError, StaleMessage, TooFewSurvivors
from .messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from .params import RoundParams

# The device's stages, in order: each method moves it to the next.
STAGES = ("advertise", "share", "masked", "unmask", "done")


class DeviceRound:
    """One device in one round. Fresh keys and seed each round; nothing outlives it."""

    def __init__(self, name: str, params: RoundParams, *, rng: np.random.Generator | None = None) -> None:
        params.validate()
        if name not in params.order:
            raise ProtocolViolation(f"device {name!r} is not in round {params.round}", "order")
        self.name = name
        self.params = params
        self.neighbours = params.neighbours(name)
        self._cipher_private, self.cipher_key = crypto.generate_keypair()
        self._mask_private, self.mask_key = crypto.generate_keypair()
        self._rng = rng or np.random.default_rng()
        self._stage = "advertise"
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._seed = b""
        self._dealers: frozenset[str] = frozenset()  # neighbours whose shares reached this device
        self._refused: frozenset[str] = frozenset()
        # Shares that did not authenticate, each refusal naming the dealer; never revealed.
        self.refused: list[ShareAuthenticationError] = []

    # stages -----------------------------------------------------------------
    def advertise(self) -> AdvertiseKeys:
        self._advance("advertise")
        return AdvertiseKeys(round=self.params.round, device=self.name, cipher_key=self.cipher_key,
                             mask_key=self.mask_key)

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Deal Shamir shares of the self-mask seed and of the mask private key to every neighbour
        that advertised keys, each encrypted for its recipient."""
        self._check(directory.round, "share")
        keys = dict(directory.keys)
        if keys.get(self.name) != (self.cipher_key, self.mask_key):
            raise ProtocolViolation(f"the key directory does not hold device {self.name!r}'s own keys",
                                    "keys")
        strangers = sorted(set(keys) - self.neighbours)
        if strangers:
            raise ProtocolViolation(f"the key directory names {strangers[0]!r}, not a neighbour", "keys")
        every_key = [k for pair in keys.values() for k in pair]
        if len(set(every_key)) != len(every_key):
            raise ProtocolViolation("the key directory gives two devices the same key", "keys")
        for name, pair in keys.items():
            for key in pair:
                try:
                    crypto.check_public_key(key)
                except crypto.CryptoFailure as exc:
                    raise ProtocolViolation(f"device {name!r}'s key: {exc}", "keys",
                                            device=name) from None
        if len(keys) < self.params.threshold:
            raise TooFewSurvivors(
                f"round {self.params.round}: {len(keys)} neighbours advertised keys, "
                f"{self.params.threshold} needed", "keys")
        self._advance("share")
        self._keys = keys
        self._seed = os.urandom(crypto.KEY_BYTES)
        holders = sorted(keys)
        dealt = {kind: crypto.split_secret(secret, self.params.threshold, len(holders))
                 for kind, secret in ((crypto.SEED, self._seed), (crypto.MASK_KEY, self._mask_private))}
        shares = {}
        for position, holder in enumerate(holders):
            sealed = []
            for kind in crypto.KINDS:
                index, share = dealt[kind][position]
                key = self._share_key(holder, self.name, holder, kind)
                sealed.append(crypto.seal(key, crypto.share_plaintext(index, share),
                                          crypto.share_associated_data(self.params.round, self.name,
                                                                       holder, kind)))
            shares[holder] = (sealed[0], sealed[1])
        return ShareKeys(round=self.params.round, device=self.name,
                         commitment=crypto.commitment(self._seed, self.params.round, self.name),
                         shares=shares)

    def masked_input(self, bundle: ShareBundle, update: np.ndarray | Mapping[str, np.ndarray],
                     weight: int) -> MaskedInput:
        """Check the shares dealt to this device, then mask the update.

        ``update`` is the vector (or tensors, flattened in name order) to sum, normally the
        change from the global model; ``weight`` is the example count (capped at the round's
        max weight), or 1 for an unweighted mean. A share that does not authenticate is refused
        (see :attr:`refused`) and reported to the server, and the round goes on.
        """
        self._check(bundle.round, "masked")
        dealers = frozenset(bundle.shares)
        strangers = sorted(dealers - set(self._keys))
        if strangers:
            raise ProtocolViolation(f"shares from {strangers[0]!r}, which is not a neighbour", "shares")
        if self.name not in dealers:
            raise ProtocolViolation(f"the bundle lacks device {self.name!r}'s own shares", "shares")
        if len(dealers) < self.params.threshold:
            raise TooFewSurvivors(
                f"round {self.params.round}: {len(dealers)} neighbours dealt shares, "
                f"{self.params.threshold} needed", "shares")
        vector = flatten(update) if isinstance(update, Mapping) else np.asarray(update).ravel()
        weight = min(int(weight), self.params.max_weight)
        plain = encode(vector, weight, self.params, self._rng)  # checks length, finiteness and weight
        refused = []
        for dealer in sorted(dealers):
            for kind, sealed in zip(crypto.KINDS, bundle.shares[dealer], strict=True):
                try:
                    index, _ = crypto.parse_share_plaintext(crypto.open_sealed(
                        self._share_key(dealer, dealer, self.name, kind), sealed,
                        crypto.share_associated_data(self.params.round, dealer, self.name, kind)))
                    if not 1 <= index <= len(self.params.neighbours(dealer)):
                        raise crypto.CryptoFailure(f"share index {index} is out of range")
                except crypto.CryptoFailure as exc:
                    self.refused.append(ShareAuthenticationError(
                        f"device {dealer!r}'s {kind} share for {self.name!r} in round "
                        f"{self.params.round} is refused: {exc}", "shares", device=dealer))
                    refused.append(dealer)
                    break
        self._advance("masked")
        self._dealers = dealers
        self._refused = frozenset(refused)
        total = plain
        masks.add(total, masks.self_mask(self._seed, self.params, self.name), 1, self.params)
        for peer in sorted(dealers - {self.name}):
            mask = masks.pair_mask(self._mask_private, self._keys[peer][1], self.params, self.name, peer)
            masks.add(total, mask, masks.pair_sign(self.name, peer), self.params)
        return MaskedInput(round=self.params.round, device=self.name, vector=total,
                           refused=tuple(refused))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal one share key per neighbour: the seed's if it survived, the mask key's if it
        dropped; never both for one neighbour, and only once per round."""
        self._check(request.round, "unmask")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolViolation(f"{sorted(survivors & dropped)[0]!r} is listed as survivor and dropped",
                                    "dropped")
        strangers = sorted((survivors | dropped) - self._dealers)
        if strangers:
            raise ProtocolViolation(f"{strangers[0]!r} dealt no shares to this device", "survivors")
        if self.name not in survivors:
            raise ProtocolViolation(f"device {self.name!r} sent its input but is not listed as a survivor",
                                    "survivors")
        if len(survivors) < self.params.threshold:
            raise TooFewSurvivors(
                f"round {self.params.round}: {len(survivors)} neighbours survived, "
                f"{self.params.threshold} needed; revealing shares now could expose an input",
                "survivors")
        self._advance("unmask")
        reveal = {crypto.SEED: sorted(survivors - self._refused),
                  crypto.MASK_KEY: sorted(dropped - self._refused)}
        keys = {kind: {d: self._share_key(d, d, self.name, kind) for d in names}
                for kind, names in reveal.items()}
        return UnmaskResponse(round=self.params.round, device=self.name, seed_keys=keys[crypto.SEED],
                              mask_keys=keys[crypto.MASK_KEY])

    # internals --------------------------------------------------------------
    def _share_key(self, peer: str, sender: str, recipient: str, kind: str) -> bytes:
        return crypto.share_key(self._cipher_private, self._keys[peer][0], self.params.round, sender,
                                recipient, kind)

    def _check(self, round_number: int, stage: str) -> None:
        if round_number != self.params.round:
            raise StaleMessage(f"a message for round {round_number} reached device {self.name!r} in round "
                               f"{self.params.round}", "round")
        if self._stage != stage:
            raise StaleMessage(f"device {self.name!r} is at stage {self._stage!r}, not {stage!r}", "stage")

    def _advance(self, stage: str) -> None:
        if self._stage != stage:
            raise StaleMessage(f"device {self.name!r} is at stage {self._stage!r}, not {stage!r}", "stage")
        self._stage = STAGES[STAGES.index(stage) + 1]
