"""auto-converge on the source: :class:`~.convergence.AutoConverge`'s decisions applied to the
guest's vCPU throttle (:mod:`livemig.guest.throttle`), and their figures kept in the migration's
statistics (``cpu-throttle-percentage``; livemig's peak and time held). docs/wire.md, "Convergence"."""

from __future__ import annotations

from ..guest import Guest
from ..params import MigrationParameters
from .convergence import AutoConverge
from .stats import MigrationStats


class GuestThrottling:
    """The throttle of one source guest during one migration (capability ``auto-converge``)."""

    def __init__(self, guest: Guest, params: MigrationParameters, stats: MigrationStats) -> None:
        self.guest = guest
        self.policy = AutoConverge.of(params)
        self.stats = stats
        self.held0 = self.held_seconds()

    def held_seconds(self) -> float:
        """Seconds the throttle held each vCPU, on average, since the guest started."""
        held = self.guest.throttle.held_seconds
        return sum(held) / max(1, len(held))

    def begin(self, now: float, transferred: int) -> None:
        """Dirty logging starts (``now`` in seconds, ``transferred`` bytes so far): the first period."""
        self.policy.begin(now, transferred)
        self.held0 = self.held_seconds()

    def on_sync(self, now: float, npages: int, page_size: int, transferred: int) -> None:
        """After a dirty sync that found ``npages``: raise the throttle when the policy says so."""
        throttle = self.guest.throttle
        pct = self.policy.on_sync(now, npages, page_size, transferred, throttle.percentage)
        if pct is not None:
            throttle.set(pct)
            self.stats.cpu_throttle_percentage = throttle.percentage
            self.stats.cpu_throttle_peak = max(self.stats.cpu_throttle_peak, throttle.percentage)

    def stop(self) -> None:
        """The throttle ends with the iterations (switchover, failure, cancel), as QEMU's cpu_throttle_stop."""
        self.guest.throttle.stop()
        self.stats.cpu_throttle_percentage = 0
        self.stats.cpu_throttle_held_s = self.held_seconds() - self.held0
