"""Tokens and secrets: issued once, stored only as hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def new_token() -> str:
    """A 256-bit random URL-safe token that does not start with "-": people paste it after a flag
    (``--enroll-secret TOKEN``), where a leading "-" reads as another option."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def hash_token(token: str) -> str:
    # Tokens are 256-bit random values, so a fast hash is enough; a slow KDF
    # only matters for guessable, human-chosen passwords.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


def secret_matches(given: object, expected: str) -> bool:
    if not isinstance(given, str) or not given:  # a JSON body may hold any type here
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def load_or_create_secret(path: Path) -> str:
    """Read a secret file, or create one readable by its owner only.

    This is how a laptop run works without configuration: the server writes its
    enrollment secret and admin token beside its state, and local devices and
    the dashboard read them from there.
    """
    if path.exists():
        check_private(path)
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = new_token()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
    return value


def check_private(path: Path) -> None:
    """Refuse a secret file that others can read: whoever reads it can act as an admin or enroll."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(f"secret file {path} is readable by others (mode {mode & 0o777:o}); "
                         f"run: chmod 600 {path}")


def read_secret(path: Path) -> str | None:
    """Read a secret file if it exists and is not empty."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None
