"""Pure pieces: rate limiter (fake clock), convergence policy, status machine, page runs, digests."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from livemig.errors import MigrationError
from livemig.migration import state
from livemig.migration.convergence import Convergence
from livemig.ram.digest import ChunkDigest
from livemig.ram.pages import chunks, merge_pages, nonzero_pages, runs
from livemig.transport.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept += s
        self.now += s


def test_rate_limiter_holds_the_rate() -> None:
    c = FakeClock()
    lim = RateLimiter(1_000_000, clock=c.clock, sleep=c.sleep)
    for _ in range(100):
        lim.acquire(100_000)  # 10 MB at 1 MB/s
    # the only credit is 10 ms of rate: 10 MB takes 10 s minus at most that
    assert 9.99 <= c.now <= 10.0


def test_rate_limiter_starts_with_little_credit() -> None:
    """A small transfer is capped from its first bytes: only 10 ms of rate goes out unpaced."""
    c = FakeClock()
    rate = 64 * 1024
    lim = RateLimiter(rate, clock=c.clock, sleep=c.sleep)
    assert lim.acquire(rate // 100) == 0.0  # within the credit
    assert lim.acquire(rate) == pytest.approx(1.0, abs=1e-3)  # a second's worth of bytes: a second
    assert c.now == pytest.approx(1.0, abs=1e-3)


def test_rate_limiter_idle_time_does_not_bank_a_burst() -> None:
    c = FakeClock()
    rate = 100_000
    lim = RateLimiter(rate, clock=c.clock, sleep=c.sleep)
    c.now += 100.0  # idle (e.g. the main stream waiting for a flush)
    assert lim.acquire(rate) == pytest.approx(0.99)  # only 10 ms were banked, not 100 s


def test_rate_limiter_queues_writers_behind_each_other() -> None:
    """Writers that charge at the same moment wait out each other's debt: together they hold the rate."""
    c = FakeClock()
    waits: list[float] = []
    lim = RateLimiter(1000, clock=c.clock, sleep=waits.append)  # sleeps recorded, clock stands still
    for _ in range(3):
        lim.acquire(1000)
    assert waits == pytest.approx([0.99, 1.99, 2.99])


def test_rate_limiter_set_rate_lifts_and_restores_the_cap() -> None:
    c = FakeClock()
    lim = RateLimiter(1000, clock=c.clock, sleep=c.sleep)
    lim.set_rate(0)  # switchover: QEMU lifts the cap
    assert lim.acquire(10**9) == 0.0 and c.slept == 0.0
    lim.set_rate(1000)
    assert lim.acquire(1010) == pytest.approx(1.0)


def test_rate_limiter_unlimited_never_sleeps() -> None:
    c = FakeClock()
    lim = RateLimiter(0, clock=c.clock, sleep=c.sleep)
    for _ in range(100):
        assert lim.acquire(1 << 30) == 0.0
    assert c.slept == 0.0


def test_convergence() -> None:
    p = Convergence(downtime_limit_ms=300)
    assert Convergence.expected_downtime_ms(1000, 10_000) == pytest.approx(100.0)
    assert p.should_switch(1000, 10_000, passes=1)
    assert not p.should_switch(10_000, 10_000, passes=1)
    assert not p.should_switch(1, 0, passes=5)
    assert p.should_switch(0, 0, passes=1)
    assert Convergence(300, max_passes=3).should_switch(10**9, 1, passes=3)


def test_status_machine_follows_qemu() -> None:
    m = state.StatusMachine()
    seen: list[str] = []
    m.listeners.append(seen.append)
    for s in (state.SETUP, state.ACTIVE, state.DEVICE, state.COMPLETED):
        m.step(s)
    assert seen == ["setup", "active", "device", "completed"]
    with pytest.raises(MigrationError, match="cannot go from 'completed' to 'active'"):
        m.step(state.ACTIVE)
    m2 = state.StatusMachine()
    m2.step(state.SETUP)
    m2.step(state.CANCELLING)
    assert not m2.try_step(state.COMPLETED)
    m2.step(state.CANCELLED)


def test_runs_and_chunks() -> None:
    idx = np.array([1, 2, 3, 7, 9, 10], dtype=np.int64)
    assert runs(idx) == [(1, 3), (7, 1), (9, 2)]
    assert runs(idx[:0]) == []
    assert runs(np.array([4, 5, 6, 7])) == [(4, 4)]
    # a peer's order is kept: unsorted offsets spanning a contiguous range are not one run
    assert runs(np.array([3, 5, 4, 6])) == [(3, 1), (5, 1), (4, 1), (6, 1)]
    assert [c.tolist() for c in chunks(idx, 4)] == [[1, 2, 3, 7], [9, 10]]


def test_chunk_digest_tracks_writes() -> None:
    m = mmap.mmap(-1, 8 << 20)
    mv = memoryview(m)
    a, b = ChunkDigest(mv, chunk_pages=64), ChunkDigest(memoryview(bytearray(8 << 20)), chunk_pages=64)
    assert a.digest() == b.digest()
    m[5 * 4096] = 1
    assert a.digest() == b.digest()  # not marked: the cache is trusted
    a.mark_pages(np.array([5]))
    assert a.digest() != b.digest()
    assert a.digest(full=True) == a.digest()
    del mv


def test_merge_pages_is_a_sorted_union() -> None:
    a = np.array([1, 4, 9], dtype=np.int64)
    assert merge_pages(a, np.array([2, 4, 10], dtype=np.int64)).tolist() == [1, 2, 4, 9, 10]
    assert merge_pages(a, a[:0]) is a and merge_pages(a[:0], a) is a


def test_nonzero_pages_finds_a_single_late_byte() -> None:
    pages = np.zeros((6, 4096), dtype=np.uint8)
    pages[1, 0] = 1
    pages[3, 4095] = 7  # only the last byte: the prefix check alone would miss it
    pages[4, 64] = 1
    assert nonzero_pages(pages.view(np.uint64)).tolist() == [False, True, False, True, True, False]


def test_assume_zero_matches_hashing_zero_memory() -> None:
    a = ChunkDigest(memoryview(bytearray(3 * 64 * 4096 + 4096)), chunk_pages=64)
    b = ChunkDigest(memoryview(bytearray(3 * 64 * 4096 + 4096)), chunk_pages=64)
    a.assume_zero()
    assert a.refresh() == 0  # nothing left to hash
    assert a.digest() == b.digest()


def test_first_failure_keeps_the_original_and_names_where() -> None:
    from livemig.errors import WireError

    f = state.FirstFailure()
    f.check()  # nothing yet
    first = WireError("multifd: unknown ram block", "nope", "one of ['pc.ram']")
    assert f.record(first, "multifd channel 3, packet 9")
    assert not f.record(OSError("later"), "elsewhere")  # a consequence: dropped
    with pytest.raises(MigrationError) as info:
        f.check()
    assert str(info.value) == "multifd channel 3, packet 9: " + str(first)
    assert info.value.__cause__ is first and first.value == "nope"
    assert str(state.in_context("main", OSError("boom"))) == "main: OSError: boom"


def test_os_errors_in_words_without_errno() -> None:
    import errno

    from livemig.errors import os_reason

    pipe = BrokenPipeError(errno.EPIPE, "Broken pipe")
    assert str(state.in_context("multifd channel 1", pipe)) == "multifd channel 1: Broken pipe"
    assert os_reason(pipe) == "Broken pipe" and os_reason(ValueError("x")) == "x"


def test_convergence_counts_the_switchover_fixed_cost() -> None:
    p = Convergence(downtime_limit_ms=300)
    assert Convergence.expected_downtime_ms(1000, 10_000, fixed_ms=50) == pytest.approx(150.0)
    assert p.should_switch(1000, 10_000, passes=1, fixed_ms=150)
    assert not p.should_switch(1000, 10_000, passes=1, fixed_ms=250)  # 100 ms of pages + 250 fixed
    assert p.should_switch(0, 10_000, passes=1, fixed_ms=1000)  # nothing dirty: another pass cannot help
