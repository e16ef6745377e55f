"""When to stop iterating and switch over: a pure policy (cloud-hypervisor's is_precopy_converged).

The expected downtime is the time to move what is still dirty at the rate pages have moved so far
(pages/s over the active phase, zero pages included: they are part of what the final pass moves),
plus the switchover's fixed cost: what the final pass costs even with no page left (the SYNC round
on every channel, the destination catching up with what is still in flight, the state and digest
exchange), as the source last measured it (``fixed_ms``; see Source._iterate). Switch over when it
fits ``downtime-limit``, or after ``max_passes`` passes if that is set.

With the ``auto-converge`` capability, :class:`AutoConverge` decides after each dirty-log sync how
much of the vCPUs' time to take away (the throttle itself: :mod:`livemig.guest.throttle`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..params import MigrationParameters


@dataclass(frozen=True)
class Convergence:
    downtime_limit_ms: int
    max_passes: int = 0

    @staticmethod
    def expected_downtime_ms(dirty_pages: int, pages_per_second: float, fixed_ms: float = 0.0) -> float:
        """Milliseconds to move ``dirty_pages`` at ``pages_per_second`` (inf if nothing moved yet),
        plus the switchover's fixed cost ``fixed_ms``."""
        if dirty_pages == 0:
            return fixed_ms
        if pages_per_second <= 0:
            return float("inf")
        return dirty_pages / pages_per_second * 1000.0 + fixed_ms

    def should_switch(self, dirty_pages: int, pages_per_second: float, passes: int, fixed_ms: float = 0.0) -> bool:
        """True when the remaining pages and the fixed cost fit the downtime limit, or the pass budget
        is spent. An idle guest (nothing dirty) switches over whatever the fixed cost: another pass
        would not make it smaller."""
        if self.max_passes and passes >= self.max_passes or dirty_pages == 0:
            return True
        return self.expected_downtime_ms(dirty_pages, pages_per_second, fixed_ms) <= self.downtime_limit_ms


@dataclass
class AutoConverge:
    """QEMU's auto-converge decision (``migration_trigger_throttle`` and ``mig_throttle_guest_down``),
    as a pure state machine fed after every dirty-log sync (docs/wire.md, "Convergence").

    A *period* runs from one evaluation to the next and lasts more than :data:`PERIOD_S`: syncs closer
    together add their dirty pages to the same period. At the end of a period, when the bytes dirtied
    in it exceed ``throttle_trigger_threshold`` percent of the bytes transferred in it, a counter goes
    up; when it reaches 2 (twice, not necessarily in a row: QEMU never resets it otherwise) it goes
    back to 0 and the throttle starts at ``cpu_throttle_initial`` or, already on, rises by
    ``cpu_throttle_increment`` (with ``cpu_throttle_tailslow``: by no more than what would bring the
    dirty bytes down to the threshold), never past ``max_cpu_throttle``.
    """

    initial: int = 20
    increment: int = 10
    tailslow: bool = False
    maximum: int = 99
    threshold: int = 50
    #: periods found over the threshold since the throttle last changed
    high_count: int = 0
    period_start: float | None = None
    period_bytes_start: int = 0
    period_dirty_pages: int = 0

    #: a period ends at the first sync more than this many seconds after it began (QEMU: 1000 ms)
    PERIOD_S = 1.0

    @classmethod
    def of(cls, params: MigrationParameters) -> AutoConverge:
        return cls(params.cpu_throttle_initial, params.cpu_throttle_increment, params.cpu_throttle_tailslow,
                   params.max_cpu_throttle, params.throttle_trigger_threshold)

    def begin(self, now: float, transferred: int) -> None:
        """The dirty log starts: the first period begins (``now`` in seconds, bytes transferred so far)."""
        self.period_start, self.period_bytes_start, self.period_dirty_pages = now, transferred, 0

    def on_sync(self, now: float, dirty_pages: int, page_size: int, transferred: int, current: int) -> int | None:
        """One dirty-log sync found ``dirty_pages``; ``transferred`` bytes so far, the throttle now at
        ``current`` percent (0 = off). Returns the new throttle percentage, or None to leave it."""
        if self.period_start is None:
            self.begin(now, transferred)
        assert self.period_start is not None
        self.period_dirty_pages += dirty_pages
        if now <= self.period_start + self.PERIOD_S:
            return None
        dirty_bytes = self.period_dirty_pages * page_size
        threshold_bytes = (transferred - self.period_bytes_start) * self.threshold // 100
        self.begin(now, transferred)
        if dirty_bytes <= threshold_bytes:
            return None
        self.high_count += 1
        if self.high_count < 2:
            return None
        self.high_count = 0
        return self.throttle_down(current, dirty_bytes, threshold_bytes)

    def throttle_down(self, current: int, dirty_bytes: int, threshold_bytes: int) -> int:
        """The next throttle from ``current`` (0 = off): the initial value, or ``current`` plus the
        increment (tailslow: at most the share that would bring ``dirty_bytes`` to ``threshold_bytes``),
        capped at the maximum."""
        if not current:
            return self.initial
        inc = self.increment
        if self.tailslow:
            cpu_now = 100 - current
            cpu_ideal = int(cpu_now * (threshold_bytes / dirty_bytes))
            inc = min(cpu_now - cpu_ideal, self.increment)
        return min(current + inc, self.maximum)
