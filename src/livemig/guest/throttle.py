"""vCPU throttling, as QEMU's ``cpu-throttle.c`` does it (docs/wire.md, "Convergence").

A throttle of ``pct`` percent takes that share of every vCPU's time away: a timer ticks every
``TIMESLICE / (1 - pct/100)`` seconds and schedules, on each vCPU, one sleep of
``pct/(100 - pct) * TIMESLICE`` seconds (:func:`sleep_seconds`), so each vCPU runs for about one
:data:`TIMESLICE` (10 ms) and then sleeps for the rest of the period. The percentage is kept in
1..99 (:data:`PCT_MIN`, :data:`PCT_MAX`); 0 means off.

The vCPU threads take their sleep at a safe point of their own loop (:meth:`CpuThrottle.hold`):
the portable guest between batches, the KVM guest between two ``KVM_RUN`` (the timer's ``kick``
makes a vCPU inside ``KVM_RUN`` come out). A sleep ends early when the guest is paused, as QEMU's
ends when the vCPU is stopped. Each hold is accounted (:attr:`CpuThrottle.held_seconds`,
:attr:`CpuThrottle.holds`), so the time taken away can be checked.

Workloads that pace themselves against the clock move their clock forward by the time held
(the value :meth:`CpuThrottle.hold` returns): their rate is a rate of vCPU time, as a CPU-bound
guest's is, so a throttle of ``pct`` cuts it to about ``(100 - pct)`` percent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: seconds each vCPU runs between two throttle sleeps (QEMU's CPU_THROTTLE_TIMESLICE_NS)
TIMESLICE = 0.010
#: the range a throttle percentage is clamped to when set (QEMU's CPU_THROTTLE_PCT_MIN/MAX)
PCT_MIN = 1
PCT_MAX = 99


def sleep_seconds(pct: int) -> float:
    """Seconds a vCPU sleeps per tick at ``pct`` percent: ``pct/(100 - pct) * TIMESLICE`` (0 when off).

    20 % -> 2.5 ms, 50 % -> 10 ms, 99 % -> 990 ms.
    """
    if pct <= 0:
        return 0.0
    ratio = pct / 100
    return ratio / (1 - ratio) * TIMESLICE


def tick_seconds(pct: int) -> float:
    """Seconds between two ticks at ``pct`` percent: ``TIMESLICE / (1 - pct/100)`` (one run, one sleep)."""
    return TIMESLICE / (1 - min(max(pct, 0), PCT_MAX) / 100)


class CpuThrottle:
    """The throttle of one guest's ``nvcpus`` vCPUs.

    ``kick`` (optional) is called after each tick has scheduled the sleeps, from the timer thread:
    it must make every vCPU reach its next :meth:`hold` soon (KVM: leave ``KVM_RUN``).
    Thread-safe: :meth:`set` and :meth:`stop` from any thread, :meth:`hold` from vCPU threads.
    """

    def __init__(self, nvcpus: int, kick: Callable[[], None] | None = None) -> None:
        self.nvcpus = nvcpus
        self.kick = kick
        self._pct = 0
        self._cv = threading.Condition()
        self._scheduled = [False] * nvcpus
        self._timer: threading.Thread | None = None
        #: bumped by every stop: a timer thread of an older generation ends
        self._gen = 0
        self._closed = False
        #: per vCPU: seconds slept for the throttle, and the number of sleeps
        self.held_seconds = [0.0] * nvcpus
        self.holds = [0] * nvcpus

    # --- control ---------------------------------------------------------------------------------
    @property
    def percentage(self) -> int:
        """The current throttle, percent of vCPU time taken away (0 = off)."""
        return self._pct

    @property
    def active(self) -> bool:
        return self._pct != 0

    def set(self, pct: int) -> None:
        """Throttle at ``pct`` percent, clamped to 1..99 as QEMU's ``cpu_throttle_set``; starts the timer
        (and schedules the first sleeps at once) when the throttle was off."""
        pct = min(max(int(pct), PCT_MIN), PCT_MAX)
        with self._cv:
            if self._closed:
                return
            was_active = self._pct != 0
            self._pct = pct
            if was_active:
                return
            self._timer = threading.Thread(target=self._tick_loop, args=(self._gen,), name="cpu-throttle",
                                           daemon=True)
            self._timer.start()

    def stop(self) -> None:
        """Throttle off (0 %); the timer ends and sleeps in progress end early."""
        with self._cv:
            self._pct = 0
            self._gen += 1
            self._scheduled = [False] * self.nvcpus
            self._cv.notify_all()

    def close(self) -> None:
        """Stop for good (the guest is closing) and wait for the timer thread."""
        with self._cv:
            self._closed = True
        self.stop()
        timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(timeout=1.0)

    def interrupt(self) -> None:
        """Wake every vCPU sleeping in :meth:`hold` so it re-checks its ``stopped`` condition (call after
        pausing the guest)."""
        with self._cv:
            self._cv.notify_all()

    # --- vCPU side -------------------------------------------------------------------------------
    def pending(self, vcpu: int) -> bool:
        """True when a sleep is scheduled on ``vcpu`` (a cheap read; call :meth:`hold` then)."""
        return self._scheduled[vcpu]

    def hold(self, vcpu: int, stopped: Callable[[], bool]) -> float:
        """Take the sleep scheduled on ``vcpu``, if any: ``sleep_seconds(pct)`` of wall time, ended early
        when ``stopped()`` becomes true (checked whenever :meth:`interrupt` is called) or the throttle
        stops. Returns the seconds slept (0.0 when nothing was scheduled)."""
        if not self._scheduled[vcpu]:
            return 0.0
        t0 = time.monotonic()
        with self._cv:
            end = t0 + sleep_seconds(self._pct)
            while self._pct and not stopped():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._scheduled[vcpu] = False
        held = time.monotonic() - t0
        self.held_seconds[vcpu] += held
        self.holds[vcpu] += 1
        return held

    # --- timer -----------------------------------------------------------------------------------
    def _tick_loop(self, gen: int) -> None:
        """QEMU's ``cpu_throttle_timer_tick``: schedule a sleep on every vCPU that has none pending,
        kick them, wait one period; end when the throttle is stopped."""
        while True:
            with self._cv:
                pct = self._pct
                if gen != self._gen or self._closed:
                    return
                for i in range(self.nvcpus):
                    self._scheduled[i] = True
            if self.kick is not None:
                self.kick()
            deadline = time.monotonic() + tick_seconds(pct)
            with self._cv:
                while gen == self._gen and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
