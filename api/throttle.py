"""Too many wrong credentials from one address: 429, with ``Retry-After``, before any check.

Tokens are 256-bit random values nobody can guess, but an enrollment secret or admin token
chosen by a person may be guessable, and the server used to answer hundreds of wrong tries a
second. Each client address gets a token bucket of failures: ``per_minute`` wrong credentials
at once, then one more every ``60 / per_minute`` seconds. A client whose bucket is empty is
answered 429 *before* its credential is compared, right or wrong, so guessing gains nothing.

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

from fedcore.errors import FedHubError

# Wrong credentials per client address and minute (also the burst); 0 turns the limit off.
FAILURES_PER_MINUTE = 20
MAX_CLIENTS = 10_000


class TooManyFailures(FedHubError):
    """A client failed to authenticate too often; ``retry_after`` is in whole seconds."""

    code = "too_many_failures"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many wrong credentials from this address; try again in {retry_after} s",
                         "Authorization")
        self.retry_after = retry_after


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

    def check(self, client: str) -> None:
        """Raise :class:`TooManyFailures` if ``client`` has no failures left."""
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            left = self._left(client, now)
            if left < 1.0:
                raise TooManyFailures(max(1, math.ceil((1.0 - left) / self.rate)))

    def failed(self, client: str) -> None:
        """Spend one of ``client``'s failures."""
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            self._buckets[client] = (max(0.0, self._left(client, now) - 1.0), now)
            self._buckets.move_to_end(client)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
