"""When to stop iterating and switch over: a pure policy (cloud-hypervisor's is_precopy_converged).

The expected downtime is the time to move what is still dirty at the rate pages have moved so far
(pages/s over the active phase, zero pages included: they are part of what the final pass moves).
Switch over when it fits ``downtime-limit``, or after ``max_passes`` passes if that is set.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Convergence:
    downtime_limit_ms: int
    max_passes: int = 0

    @staticmethod
    def expected_downtime_ms(dirty_pages: int, pages_per_second: float) -> float:
        """Milliseconds to move ``dirty_pages`` at ``pages_per_second`` (inf if nothing moved yet)."""
        if dirty_pages == 0:
            return 0.0
        if pages_per_second <= 0:
            return float("inf")
        return dirty_pages / pages_per_second * 1000.0

    def should_switch(self, dirty_pages: int, pages_per_second: float, passes: int) -> bool:
        """True when the remaining pages fit the downtime limit, or the pass budget is spent."""
        if self.max_passes and passes >= self.max_passes:
            return True
        return self.expected_downtime_ms(dirty_pages, pages_per_second) <= self.downtime_limit_ms
