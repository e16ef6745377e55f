"""The engine end to end in one process: Source and Destination threads over loopback TCP."""

from __future__ import annotations

import errno
import threading
from typing import Any

import numpy as np
import pytest

from livemig.guest.base import GuestConfig
from livemig.guest.kvm.binding import KvmError
from livemig.migration.destination import Destination
from livemig.migration.source import Source
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from support.fakeguest import FakeGuest


def _migrate(params: MigrationParameters, memory: int = 8 << 20, writer: Any = None,
             dst_params: MigrationParameters | None = None,
             dst_kind: type[FakeGuest] = FakeGuest) -> tuple[Any, dict[str, Any], FakeGuest, FakeGuest]:
    cfg = GuestConfig(memory=memory, seed=3)
    src_guest = FakeGuest(cfg)
    dst_guest = dst_kind(cfg, incoming=True)
    dst = Destination(parse_address("tcp:127.0.0.1:0"), dst_params or params, guest=dst_guest, timeout=10)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    t.start()
    src_guest.start()
    src = Source(src_guest, parse_address(f"tcp:127.0.0.1:{dst.port}"), params, timeout=10)
    if writer:
        writer(src, src_guest)
    stats = src.run()
    t.join(timeout=30)
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

    def writer(src: Source, g: FakeGuest) -> None:
        orig = src._sync_dirty
        calls = {"n": 0}

        def sync() -> dict[str, np.ndarray]:
            calls["n"] += 1
            g.write(np.arange(calls["n"], 2048, 7), 100 + calls["n"])
            return orig()

        src._sync_dirty = sync  # type: ignore[method-assign]

    stats, dres, sg, dg = _migrate(params, writer=writer)
    assert stats.status == "completed", stats.error
    assert stats.passes == 3
    assert np.array_equal(sg.blocks[0].pages, dg.blocks[0].pages)


def test_method_mismatch_refused_before_ram_moves() -> None:
    params = MigrationParameters(multifd_channels=2, multifd_compression="zstd", max_bandwidth=0)
    other = MigrationParameters(multifd_channels=2, multifd_compression="zlib", max_bandwidth=0)
    stats, dres, sg, dg = _migrate(params, dst_params=other)
    assert stats.status == "failed"
    assert "multifd-compression differs" in stats.error
    assert stats.multifd_bytes == 0
    assert sg.running
    assert dres["status"] == "failed"
    assert not dg.blocks[0].pages.any()


def test_digest_mismatch_names_the_block_and_the_guest_never_runs() -> None:
    """A write the dirty log missed: --full-verify on the source catches it at switchover."""
    params = MigrationParameters(multifd_channels=2, multifd_compression="none", max_bandwidth=0, max_passes=2)
    cfg = GuestConfig(memory=8 << 20, seed=3)
    src_guest = FakeGuest(cfg)
    dst_guest = FakeGuest(cfg, incoming=True)
    dst = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=dst_guest, timeout=10)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    t.start()
    src_guest.start()
    src = Source(src_guest, parse_address(f"tcp:127.0.0.1:{dst.port}"), params, timeout=10, full_verify=True)
    orig = src._sync_dirty
    calls = []

    def sync() -> dict[str, np.ndarray]:
        if not calls:
            src_guest.blocks[0].pages[10, 100] ^= 0xFF  # written behind the dirty log's back
        calls.append(1)
        return orig()

    src._sync_dirty = sync  # type: ignore[method-assign]
    stats = src.run()
    t.join(timeout=30)
    assert stats.status == "failed"
    assert "RAM block 'pc.ram' digest mismatch" in stats.error
    assert out["status"] == "failed" and dst_guest.resumed == 0
    assert src_guest.running


class _StateRefused(FakeGuest):
    """A destination guest whose state load fails as a KVM ioctl does (an error class with required args)."""

    def load_state(self, blob: bytes) -> None:
        raise KvmError("KVM_SET_SREGS", errno.EINVAL, "vcpu 0")


def test_destination_guest_failure_reaches_the_source_with_its_reason() -> None:
    params = MigrationParameters(multifd_channels=2, multifd_compression="none", max_bandwidth=0)
    stats, dres, sg, dg = _migrate(params, dst_kind=_StateRefused)
    assert stats.status == "failed"
    assert "destination failed" in stats.error
    assert "KVM_SET_SREGS failed: Invalid argument (EINVAL) [vcpu 0]" in stats.error, stats.error
    assert dres["status"] == "failed" and "KVM_SET_SREGS" in dres["error-desc"]
    assert dg.resumed == 0 and sg.running
