"""The vCPU throttle (livemig.guest.throttle, QEMU's cpu-throttle.c): its arithmetic, its clamping, its
timer, and that it really holds the vCPUs of both guest kinds back. No assertion depends on tight
timing: the rate ratios are loose and the sleep accounting is compared with generous bounds."""

from __future__ import annotations

import threading
import time

import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.guest.base import Guest
from livemig.guest.throttle import PCT_MAX, TIMESLICE, CpuThrottle, sleep_seconds, tick_seconds


@pytest.mark.parametrize(("pct", "sleep_ms"), [(0, 0.0), (1, 10 / 99), (20, 2.5), (50, 10.0), (80, 40.0),
                                               (99, 990.0)])
def test_sleep_per_tick_is_pct_over_rest_of_a_timeslice(pct: int, sleep_ms: float) -> None:
    assert sleep_seconds(pct) * 1000 == pytest.approx(sleep_ms)
    if pct:
        # one tick = one timeslice of running + the sleep: the vCPU runs (100 - pct) % of the time
        assert tick_seconds(pct) == pytest.approx(TIMESLICE + sleep_seconds(pct))
        assert TIMESLICE / tick_seconds(pct) == pytest.approx(1 - pct / 100)


def test_set_clamps_to_1_99_and_stop_turns_it_off() -> None:
    t = CpuThrottle(2)
    try:
        assert t.percentage == 0 and not t.active
        t.set(150)
        assert t.percentage == PCT_MAX and t.active
        t.set(0)
        assert t.percentage == 1
        t.stop()
        assert t.percentage == 0 and not t.active
    finally:
        t.close()


def test_tick_schedules_every_vcpu_and_kicks() -> None:
    kicks = threading.Event()
    t = CpuThrottle(3, kick=kicks.set)
    try:
        t.set(50)
        assert kicks.wait(2)
        assert all(t.pending(i) for i in range(3))
        assert t.hold(1, lambda: False) >= sleep_seconds(50) * 0.9
        assert not t.pending(1) and t.holds[1] == 1 and t.held_seconds[1] > 0
        assert t.hold(1, lambda: False) == 0.0  # nothing scheduled until the next tick
    finally:
        t.close()


def test_stop_and_interrupt_end_a_sleep_early() -> None:
    t = CpuThrottle(1)
    t.set(99)  # 990 ms sleeps
    try:
        deadline = time.monotonic() + 2
        while not t.pending(0):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        stopped = threading.Event()
        threading.Timer(0.05, lambda: (stopped.set(), t.interrupt())).start()
        assert t.hold(0, stopped.is_set) < 0.5  # a paused vCPU does not sleep on
        t.set(99)
        while not t.pending(0):
            time.sleep(0.001)
        threading.Timer(0.05, t.stop).start()
        assert t.hold(0, lambda: False) < 0.5
    finally:
        t.close()


def _rate(g: Guest, seconds: float) -> float:
    p0, t0 = g.progress(), time.monotonic()
    time.sleep(seconds)
    return (g.progress() - p0) / (time.monotonic() - t0)


def _throttled(kind: str, rate: int) -> tuple[float, float, float, int]:
    """(rate unthrottled, rate at 95 %, seconds held, holds) of a counter guest of ``kind``.

    95 % leaves the vCPU 5 % of its time: the rate falls to a small fraction of the free one even when
    other work on the host changes how fast the guest runs between the two measurements."""
    g = create_guest(GuestConfig(kind=kind, memory=32 << 20, workload="counter", dirty_rate=rate, fill="zero"))
    try:
        g.start()
        time.sleep(0.3)
        free = _rate(g, 1.0)
        g.throttle.set(95)
        time.sleep(0.1)
        held0 = g.throttle.held_seconds[0]
        slowed = _rate(g, 1.5)
        held = g.throttle.held_seconds[0] - held0
        holds = g.throttle.holds[0]
        g.throttle.stop()
        g.pause()
        g.check_workload()  # the throttle held the vCPU between steps, never in the middle of one
        return free, slowed, held, holds
    finally:
        g.close()


def test_portable_guest_is_held_back() -> None:
    free, slowed, held, holds = _throttled("portable", 40000)
    assert slowed < 0.5 * free, (free, slowed)
    assert held > 0.7 and holds > 4, (held, holds)  # 95 %: ~1.4 s of 1.5 s, a 190 ms sleep per tick


@pytest.mark.kvm
@pytest.mark.parametrize("rate", [40000, 0], ids=["paced", "unpaced"])
def test_kvm_guest_is_held_back(rate: int) -> None:
    free, slowed, held, holds = _throttled("kvm", rate)
    assert slowed < 0.5 * free, (free, slowed)
    assert held > 0.7 and holds > 4, (held, holds)


def test_pause_does_not_wait_for_a_throttle_sleep() -> None:
    g = create_guest(GuestConfig(kind="portable", memory=8 << 20, workload="dirty", dirty_rate=1000, fill="zero"))
    try:
        g.start()
        g.throttle.set(99)
        time.sleep(0.2)  # the vCPU is in a 990 ms sleep now
        t0 = time.monotonic()
        g.pause()
        g.throttle.stop()
        # the sleep began with the first tick, at set(): waiting for its end would take 0.79 s or more
        assert time.monotonic() - t0 < 0.7
        deadline = time.monotonic() + 5
        while g.throttle.holds[0] < 1:  # the vCPU's sleep was there, and ended
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        g.close()
