"""The protocol's primitives, each a thin call into a maintained library; nothing is hand-rolled.

- key agreement: X25519, and HKDF-SHA256 to turn each agreement into single-purpose keys
  (``cryptography``);
- share encryption: AES-256-GCM, its associated data binding protocol, round, sender,
  recipient and the kind of secret (``cryptography``);
- mask expansion: the ChaCha20 keystream of a 32-byte seed read as little-endian words, which
  is uniform modulo 2^bits for bits up to the word size (``cryptography``). Flower's SecAgg+
  folds its seed to 32 bits and draws from NumPy's ``RandomState``, which is neither
  cryptographic nor, through ``randint(0, range - 1)``, uniform;
- secret sharing: Shamir over GF(2^128) (``pycryptodome``), a 32-byte secret as two
  16-byte halves shared with the same indices.

Every derived key or seed is bound by its HKDF ``info`` to the protocol, the round and the
device names, so nothing derived in one round or for one pair opens anything in another.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PROTOCOL = "fedhub-secagg/1"
KEY_BYTES = 32  # X25519 keys, seeds, derived keys
NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_BYTES = 32  # one share of a 32-byte secret: two 16-byte Shamir shares
INDEX_BYTES = 2
PLAINTEXT_BYTES = INDEX_BYTES + SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
# The kinds of secret a device shares: the seed of its self mask, and its mask private key.
SEED, MASK_KEY = "seed", "mask_key"
KINDS = (SEED, MASK_KEY)


class CryptoFailure(Exception):
    """A primitive refused its input (a bad public key, a ciphertext that does not authenticate);
    the caller turns it into a refusal naming the device at fault."""


def context(*parts: str | int) -> bytes:
    """Unambiguous bytes for a tuple of labels: each part length-prefixed, so ("ab", "c") and
    ("a", "bc") never collide."""
    out = bytearray()
    for part in (PROTOCOL, *parts):
        raw = str(part).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private, public) raw bytes."""
    private = X25519PrivateKey.generate()
    return (private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_key_of(private: bytes) -> bytes:
    return (X25519PrivateKey.from_private_bytes(private).public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw))


def check_public_key(public: bytes) -> None:
    """Refuse what cannot be an X25519 public key, and low-order points whose agreement is zero."""
    if len(public) != KEY_BYTES:
        raise CryptoFailure(f"a public key is {KEY_BYTES} bytes, got {len(public)}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise CryptoFailure(f"not a usable X25519 public key: {exc}") from None


def derive(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """X25519 agreement between ``private`` and ``peer_public``, then HKDF-SHA256 bound to ``info``."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise CryptoFailure(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def share_key(private: bytes, peer_public: bytes, round_number: int, sender: str, recipient: str,
              kind: str) -> bytes:
    """The AES key of one share: one per round, ordered pair of devices and kind of secret, so
    revealing it opens exactly that share and nothing else."""
    return derive(private, peer_public, context("share-key", round_number, sender, recipient, kind))


def share_associated_data(round_number: int, sender: str, recipient: str, kind: str) -> bytes:
    return context("share", round_number, sender, recipient, kind)


def pair_seed(private: bytes, peer_public: bytes, round_number: int, a: str, b: str) -> bytes:
    """The seed of the pairwise mask between devices ``a`` and ``b``: the same from either side."""
    first, second = sorted((a, b))
    return derive(private, peer_public, context("pair-mask", round_number, first, second))


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM with a random nonce, returned as nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, blob: bytes, associated_data: bytes) -> bytes:
    if len(blob) != CIPHERTEXT_BYTES:
        raise CryptoFailure(f"an encrypted share is {CIPHERTEXT_BYTES} bytes, got {len(blob)}")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise CryptoFailure("the encrypted share does not authenticate") from None


def commitment(seed: bytes, round_number: int, device: str) -> bytes:
    """A binding commitment to a self-mask seed; hiding, as the seed is 256 random bits."""
    return hashlib.sha256(context("seed-commitment", round_number, device) + seed).digest()


def expand(seed: bytes, count: int, bits: int, round_number: int, purpose: str) -> np.ndarray:
    """``count`` uniform integers modulo 2^bits (as uint64) from the ChaCha20 keystream of a key
    derived from ``seed``; the same seed, round and purpose always give the same vector."""
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
               info=context("mask", round_number, purpose)).derive(seed)
    word = 4 if bits <= 32 else 8
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(count * word))
    words = np.frombuffer(stream, dtype=f"<u{word}").astype(np.uint64)
    if bits < word * 8:
        np.bitwise_and(words, np.uint64((1 << bits) - 1), out=words)
    return words


def split_secret(secret: bytes, threshold: int, count: int) -> list[tuple[int, bytes]]:
    """Shamir shares (index from 1, 32 bytes) of a 32-byte secret; any ``threshold`` rebuild it."""
    if len(secret) != KEY_BYTES:
        raise ValueError(f"secrets are {KEY_BYTES} bytes")
    low = Shamir.split(threshold, count, secret[:16])
    high = Shamir.split(threshold, count, secret[16:])
    return [(i, a + b) for (i, a), (_, b) in zip(low, high, strict=True)]


def combine_shares(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret from exactly ``threshold`` shares with distinct indices (Shamir cannot tell a
    wrong share: callers check the result against a commitment or a public key)."""
    low = Shamir.combine([(i, s[:16]) for i, s in shares])
    high = Shamir.combine([(i, s[16:]) for i, s in shares])
    return low + high


def share_plaintext(index: int, share: bytes) -> bytes:
    return index.to_bytes(INDEX_BYTES, "big") + share


def parse_share_plaintext(plaintext: bytes) -> tuple[int, bytes]:
    if len(plaintext) != PLAINTEXT_BYTES:
        raise CryptoFailure("a decrypted share has the wrong length")
    return int.from_bytes(plaintext[:INDEX_BYTES], "big"), plaintext[INDEX_BYTES:]
