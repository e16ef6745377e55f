"""The bandwidth cap: a token bucket over bytes really written to the sockets.

QEMU 7.2 charges multifd pages at their uncompressed size, so on a slow link compression buys
nothing; livemig charges what is written (after compression), so a compressed migration moves
more guest RAM through the same cap. Every byte counts: the main stream, the multifd handshakes,
packet headers, payloads and SYNC packets (docs/wire.md, "Parameters"). The limiter is pure apart
from its clock and sleep, which tests replace.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: seconds of rate the bucket may hold as credit (and starts with)
BURST_SECONDS = 0.01


class RateLimiter:
    """Token bucket shared by every writer of a migration; ``rate`` bytes/s, 0 = unlimited.

    ``acquire(n)`` charges ``n`` bytes before they are written and sleeps (outside the lock) for as
    long as the bucket is in debt, so several threads share the rate fairly: each one waits out the
    debt of those that charged before it. A write larger than the credit still goes out whole, after
    a longer sleep.

    Credit: the bucket starts with, and never holds more than, ``burst`` = 10 ms of rate. The credit
    is exactly what may go out above the cap (bytes written by time t <= burst + rate x t), so it is
    kept small: a start credit of 256 KiB, as before, let a small or header-only migration run
    uncapped (a 2 MiB all-zero guest at 64 KiB/s went 26x over the cap), and a large ceiling refilled
    after every idle wait (the main stream waiting for a flush). 10 ms is enough to absorb sleep
    overshoot and scheduler jitter at high rates.
    """

    def __init__(
        self,
        rate: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        """New rate in bytes/s (0 = unlimited); the credit starts again at ``burst``."""
        with self._lock:
            self.rate = max(0, int(rate))
            self.burst = self.rate * BURST_SECONDS
            self._tokens = self.burst
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
