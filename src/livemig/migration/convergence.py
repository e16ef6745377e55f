"""When to stop iterating and switch over: a pure policy (cloud-hypervisor's is_precopy_converged).

The expected downtime is the time to move what is still dirty at the rate pages have moved so far
(pages/s over the active phase, zero pages included: they are part of what the final pass moves),
plus the switchover's fixed cost: what the final pass costs even with no page left (the SYNC round
on every channel, the destination catching up with what is still in flight, the state and digest
exchange), as the source last measured it (``fixed_ms``; see Source._iterate). Switch over when it
fits ``downtime-limit``, or after ``max_passes`` passes if that is set.
"""

from __future__ import annotations

from dataclasses import dataclass


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
