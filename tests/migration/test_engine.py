"""The engine end to end in one process: Source and Destination threads over an in-memory link
(``socket.socketpair`` connections: the same bytes and socket calls as TCP, no ports)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from livemig.guest.base import GuestConfig
from livemig.guest.kvm.binding import KvmError
from livemig.migration import state
from livemig.migration.destination import Destination
from livemig.migration.source import Source
from livemig.migration.stats import MigrationStats
from livemig.params import MigrationParameters
from livemig.transport.sockets import SocketPairLink
from support.fakeguest import FakeGuest


class _Writing(FakeGuest):
    """A source guest whose 'vCPU' is the test: ``before_sync(guest, n)`` runs before the n-th dirty-log
    sync (n from 1), as a guest writing between passes would."""

    before_sync: Callable[[FakeGuest, int], None] | None = None
    syncs = 0

    def sync_dirty_log(self) -> dict[str, np.ndarray]:
        self.syncs += 1
        if self.before_sync:
            self.before_sync(self, self.syncs)
        return super().sync_dirty_log()


class _StateRefused(FakeGuest):
    """A destination guest whose state load fails as a KVM ioctl does (an error class with required args)."""

    def load_state(self, blob: bytes) -> None:
        raise KvmError("KVM_SET_SREGS", errno.EINVAL, "vcpu 0")


def _migrate(params: MigrationParameters, memory: int = 8 << 20,
             before_sync: Callable[[FakeGuest, int], None] | None = None,
             dst_params: MigrationParameters | None = None, dst_kind: type[FakeGuest] = FakeGuest,
             src_guest: FakeGuest | None = None, waits_on: bool = False,
             **source_kw: Any) -> tuple[MigrationStats, dict[str, Any], FakeGuest, FakeGuest]:
    cfg = GuestConfig(memory=memory, seed=3)
    if src_guest is None:
        src_guest = _Writing(cfg)
        src_guest.before_sync = before_sync
    dst_guest = dst_kind(cfg, incoming=True)
    link = SocketPairLink()
    dst = Destination(link, dst_params or params, guest=dst_guest, timeout=10)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    t.start()
    src_guest.start()
    stats = Source(src_guest, link, params, timeout=10, **source_kw).run()
    if waits_on:  # a refused source: the destination waits for another one until cancelled
        time.sleep(0.2)
        assert t.is_alive()
        dst.cancel()
    t.join(timeout=30)
    assert not t.is_alive()
    return stats, out, src_guest, dst_guest


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 8])
def test_ram_arrives_identical(method: str, channels: int) -> None:
    params = MigrationParameters(multifd_channels=channels, multifd_compression=method, max_bandwidth=0)
    stats, dres, sg, dg = _migrate(params)
    assert stats.status == "completed", stats.error
    assert dres["status"] == "completed"
    assert np.array_equal(sg.blocks[0].pages, dg.blocks[0].pages)
    assert dg.state == sg.state and dg.resumed == 1
    q = stats.to_qapi()
    npages = (8 << 20) // 4096
    assert q["ram"]["normal"] + q["ram"]["duplicate"] == npages
    assert q["ram"]["duplicate"] >= npages // 3
    assert q["ram"]["multifd-bytes"] > 0


def test_pages_written_during_migration_arrive() -> None:
    """Pages dirtied between passes are re-sent; the last copy wins on the destination."""
    params = MigrationParameters(multifd_channels=4, multifd_compression="zstd", max_bandwidth=0, downtime_limit=0,
                                 max_passes=3)

    def write(g: FakeGuest, n: int) -> None:
        g.write(np.arange(n, 2048, 7), 100 + n)

    stats, dres, sg, dg = _migrate(params, before_sync=write)
    assert stats.status == "completed", stats.error
    assert stats.passes == 3
    assert np.array_equal(sg.blocks[0].pages, dg.blocks[0].pages)


def test_method_mismatch_refused_before_ram_moves() -> None:
    params = MigrationParameters(multifd_channels=2, multifd_compression="zstd", max_bandwidth=0)
    other = MigrationParameters(multifd_channels=2, multifd_compression="zlib", max_bandwidth=0)
    stats, dres, sg, dg = _migrate(params, dst_params=other, waits_on=True)
    assert stats.status == "failed"
    assert "multifd-compression differs" in stats.error
    assert stats.multifd_bytes == 0
    assert sg.running
    assert dres["status"] == "failed"
    assert not dg.blocks[0].pages.any()


def test_digest_mismatch_names_the_block_and_the_guest_never_runs() -> None:
    """A write the dirty log missed: --full-verify on the source catches it at switchover."""
    params = MigrationParameters(multifd_channels=2, multifd_compression="none", max_bandwidth=0, max_passes=2)

    def write_behind_the_log(g: FakeGuest, n: int) -> None:
        if n == 1:
            g.blocks[0].pages[10, 100] ^= 0xFF

    stats, out, sg, dg = _migrate(params, before_sync=write_behind_the_log, full_verify=True)
    assert stats.status == "failed"
    assert "RAM block 'pc.ram' digest mismatch" in stats.error
    assert out["status"] == "failed" and dg.resumed == 0
    assert sg.running


def test_destination_guest_failure_reaches_the_source_with_its_reason() -> None:
    params = MigrationParameters(multifd_channels=2, multifd_compression="none", max_bandwidth=0)
    stats, dres, sg, dg = _migrate(params, dst_kind=_StateRefused)
    assert stats.status == "failed"
    assert "destination failed" in stats.error
    assert "KVM_SET_SREGS failed: Invalid argument (EINVAL) [vcpu 0]" in stats.error, stats.error
    assert dres["status"] == "failed" and "KVM_SET_SREGS" in dres["error-desc"]
    assert dg.resumed == 0 and sg.running


@pytest.mark.parametrize(
    ("memory", "zero", "channels", "cap"),
    [
        (1 << 20, False, 4, 512 << 10),  # pages: payload dominates
        (4 << 20, True, 8, 32 << 10),  # all zero: only headers, handshakes, SYNCs and the main stream
    ],
)
def test_bandwidth_cap_holds_for_every_byte(memory: int, zero: bool, channels: int, cap: int) -> None:
    """Everything written before the guest is paused is paced by max-bandwidth (switchover is uncapped,
    as in QEMU). Bounded from above only: the rate may not exceed the cap by more than 25 %."""
    params = MigrationParameters(multifd_channels=channels, max_bandwidth=cap, downtime_limit=0, max_passes=1)
    seen: dict[str, float] = {}

    def progress(s: MigrationStats) -> None:
        if s.status == state.DEVICE:  # about to pause: every pre-switchover byte is written
            seen["bytes"], seen["t"] = s.transferred, time.monotonic()

    guest = FakeGuest(GuestConfig(memory=memory, seed=3), incoming=zero)  # incoming: all-zero RAM
    stats, dres, sg, dg = _migrate(params, memory=memory, src_guest=guest, on_progress=progress)
    assert stats.status == "completed", stats.error
    assert np.array_equal(sg.blocks[0].pages, dg.blocks[0].pages)
    assert seen["bytes"] > 50 * cap // 100  # far more than the limiter's credit (10 ms of rate)
    rate = seen["bytes"] / (seen["t"] - stats.start)
    assert rate <= 1.25 * cap, f"{rate / 1024:.1f} KiB/s against a cap of {cap / 1024:.0f} KiB/s"


@pytest.mark.parametrize(("sizes", "size"), [([10, 3], 4), ([4096], 4096), ([1, 1, 1], 2), ([0, 5], 5)])
def test_pieces_cut_buffers_without_reordering(sizes: list[int], size: int) -> None:
    from livemig.migration.multifd_send import pieces

    bufs = [bytes((i + k) % 256 for k in range(n)) for i, n in enumerate(sizes)]
    cut = pieces(bufs, size)
    assert all(0 < sum(v.nbytes for v in p) <= size for p in cut)
    assert b"".join(bytes(v) for p in cut for v in p) == b"".join(bufs)


def test_many_channels_hold_the_cap_and_mbps_is_the_active_rate() -> None:
    """255 channels of an all-zero guest: the active phase is almost all SYNC packets (255 x 1344
    bytes per flush round), every one charged to the cap. ``mbps`` is the active phase's rate: the
    capped setup round is not in it."""
    cap = 256 << 10
    params = MigrationParameters(multifd_channels=255, max_bandwidth=cap, downtime_limit=0, max_passes=1)
    guest = FakeGuest(GuestConfig(memory=2 << 20, seed=3), incoming=True)  # incoming: all-zero RAM
    stats, dres, sg, dg = _migrate(params, memory=2 << 20, src_guest=guest)
    assert stats.status == "completed", stats.error
    assert stats.active_bytes() > 255 * 1344  # at least one SYNC round went out while active
    rate = stats.active_bytes() / stats.active_seconds()
    assert rate <= 1.25 * cap, f"{rate / 1024:.1f} KiB/s against a cap of {cap / 1024:.0f} KiB/s"
    assert stats.to_qapi()["ram"]["mbps"] == round(rate * 8 / 1e6, 2)
    # the whole run, the setup's SYNC round included, moved more than the active phase (the
    # switchover sends no SYNC round when no page is left to send)
    assert stats.transferred > stats.active_bytes() + 255 * 1344


def test_mbps_and_remaining_of_a_migration_refused_before_ram_moved() -> None:
    params = MigrationParameters(multifd_channels=2, multifd_compression="zlib", max_bandwidth=0)
    stats, dres, sg, dg = _migrate(params, memory=1 << 20,
                                   dst_params=MigrationParameters(multifd_channels=2, max_bandwidth=0), waits_on=True)
    assert stats.status == "failed"
    ram = stats.to_qapi()["ram"]
    assert ram["remaining"] == 1 << 20 and ram["total"] == 1 << 20
    assert ram["mbps"] == 0 and ram["normal"] == 0


def test_destination_names_the_guest_size_in_words() -> None:
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0)
    link = SocketPairLink()
    logs: list[str] = []
    dst = Destination(link, params, timeout=10, log=logs.append)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    t.start()
    src_guest = FakeGuest(GuestConfig(memory=1 << 20, seed=3))
    src_guest.start()
    Source(src_guest, link, params, timeout=10).run()  # FakeGuest's state is no portable guest's: fails late
    t.join(timeout=30)
    assert any("guest from the source's config (1.00 MiB)" in line for line in logs), logs
    if dst.guest is not None:
        dst.guest.close()


def test_throttle_ends_before_a_cancelled_or_failed_status_is_reported() -> None:
    """auto-converge's throttle stops, and its time held is counted, before ``cancelled`` is reported:
    whoever reads the result when the status changes (``query-migrate``, ``livemig migrate --local``)
    sees the guest unthrottled and the seconds held, not a 0.0 filled in later by the teardown."""
    params = MigrationParameters()
    params.set("max-bandwidth", 4 << 20)  # several passes' worth of time: the cancel lands mid-iteration
    cfg = GuestConfig(memory=8 << 20, seed=3)
    src_guest, dst_guest = _Writing(cfg), FakeGuest(cfg, incoming=True)
    link = SocketPairLink()
    dst = Destination(link, params, guest=dst_guest, timeout=10)
    t = threading.Thread(target=dst.run)
    t.start()
    src_guest.start()
    source = Source(src_guest, link, params, timeout=10, auto_converge=True)
    seen: dict[str, tuple[int, float, int]] = {}

    def on_sync(guest: FakeGuest, n: int) -> None:
        if n == 2:
            guest.throttle.set(40)
            source.stats.cpu_throttle_percentage = source.stats.cpu_throttle_peak = 40
            guest.throttle.held_seconds[0] += 1.5  # as a vCPU held back for 1.5 s would have counted
            source.cancel()

    src_guest.before_sync = on_sync
    source.status.listeners.append(lambda s: seen.setdefault(s, (
        src_guest.throttle.percentage, source.stats.cpu_throttle_held_s, source.stats.cpu_throttle_percentage)))
    stats = source.run()
    t.join(timeout=30)
    assert not t.is_alive()
    assert stats.status == state.CANCELLED
    assert seen[state.CANCELLED] == (0, 1.5, 0)
