"""The bandwidth cap: a token bucket over bytes really written to the sockets.

QEMU 7.2 charges multifd pages at their uncompressed size, so on a slow link compression buys
nothing; livemig charges what is written (after compression), so a compressed migration moves
more guest RAM through the same cap. The limiter is pure apart from its clock and sleep, which tests
replace.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Token bucket shared by all channel threads; ``rate`` bytes/s, 0 = unlimited.

    ``acquire(n)`` charges ``n`` bytes and sleeps (outside the lock) for as long as the bucket is in
    debt, so several threads share the rate fairly. The bucket holds at most ``burst`` bytes of
    credit (10 ms of rate, at least 256 KiB), which bounds how far a burst can exceed the cap.
    """

    def __init__(
        self,
        rate: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        with self._lock:
            self.rate = max(0, int(rate))
            self.burst = max(256 * 1024, self.rate // 100)
            self._tokens = float(self.burst)
            self._last = self._clock()

    def acquire(self, nbytes: int) -> float:
        """Charge ``nbytes``; returns the seconds slept (0 when unlimited or within credit)."""
        if self.rate == 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
