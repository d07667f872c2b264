"""Wrong credentials from one address: 429 with ``Retry-After`` past a limit; right ones served.

Each client address gets a token bucket of failures: ``per_minute`` wrong credentials at once,
then one more every ``60 / per_minute`` seconds. A wrong credential (presented, not merely
missing) spends one; once none is left, a wrong credential from that address is answered 429
with ``Retry-After`` instead of 401/403, without spending more (so the wait it announces holds).

A *valid* credential is always served, whatever the bucket says. It used to be the other way
round (429 before the credential was even compared), and then one client's wrong guesses
locked out every client at its address, right credentials included: devices behind one NAT or
reverse proxy, a local simulation, the admin's own dashboard. Serving valid credentials means
the bucket no longer stops an attacker from *testing* guesses: a right guess is answered 200
however many wrong ones came before. What keeps guessing useless is therefore the size of the
space being guessed, not the limit:

- device tokens, and the admin token and enrollment secret the server generates, are 256-bit
  random values (``secrets.token_urlsafe(32)``): at any request rate, a guess succeeds with
  probability about n / 2**256;
- an admin token or enrollment secret chosen by a person (``FEDHUB_ADMIN_TOKEN``,
  ``FEDHUB_ENROLL_SECRET``) must be at least :data:`MIN_SECRET_CHARS` characters, checked at
  start-up by :func:`check_secret` (one ``error:`` line otherwise): even from a 32-letter
  alphabet that is 2**80 candidates, beyond reach at any request rate (no length rule stops a
  person choosing ``aaaaaaaaaaaaaaaa``, but it rules out the short words the limit was for);
- the bucket still bounds what failures cost and say: a flood of wrong credentials is answered
  cheaply with 429, a client that mistyped learns when to try again, and the 429s in the
  server's access log single out the guessing address.

Why not a library: pyrate-limiter (the maintained one) keeps one bucket per key with no bound
on how many keys it holds, so bounding it to a fixed memory would need this class's eviction
anyway, and its own part would be the two lines of arithmetic below. Here at most
``max_clients`` addresses are remembered (least recently failed forgotten first), so an
attacker changing addresses cannot grow the server's memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from fedhub.engine.errors import FedHubError

# Wrong credentials per client address and minute (also the burst); 0 turns the limit off.
FAILURES_PER_MINUTE = 20
MAX_CLIENTS = 10_000
# Shortest admin token or enrollment secret a person may choose (see the module docstring).
MIN_SECRET_CHARS = 16


class TooManyFailures(FedHubError):
    """A client failed to authenticate too often; ``retry_after`` is in whole seconds."""

    code = "too_many_failures"

    def __init__(self, retry_after: int, field: str | None = "Authorization") -> None:
        super().__init__(f"too many wrong credentials from this address; try again in {retry_after} s",
                         field)
        self.retry_after = retry_after


def check_secret(value: str, what: str) -> None:
    """ValueError (one line, naming ``what``) for a secret too short to be unguessable."""
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"{what} is {len(value)} characters; at least {MIN_SECRET_CHARS} are needed, "
                         "since anyone who can reach the server may try guesses (a random one: python -c "
                         "'import secrets; print(secrets.token_urlsafe(32))')")


class FailureLimiter:
    """Thread-safe, bounded, per-client token bucket of authentication failures."""

    def __init__(self, per_minute: int = FAILURES_PER_MINUTE, *, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # failures forgiven per second
        self._max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (left, at)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _left(self, client: str, now: float) -> float:
        left, at = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, left + (now - at) * self.rate)

    def failed(self, client: str, field: str | None = "Authorization") -> None:
        """Spend one of ``client``'s failures, or raise :class:`TooManyFailures` (naming
        ``field``) if none is left; call it only after a credential was found wrong."""
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            left = self._left(client, now)
            if left < 1.0:
                raise TooManyFailures(max(1, math.ceil((1.0 - left) / self.rate)), field)
            self._buckets[client] = (left - 1.0, now)
            self._buckets.move_to_end(client)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
