"""Post-copy (capability postcopy-ram), livemig to livemig in one process over a socket pair: the
guest resumes on the destination before its RAM is complete, faults in what it touches, and goes on
exactly (its counter workload checks every step); every page the source re-dirtied is fetched again,
each once, and the per-page hashes prove the destination started from the source's RAM."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.guest.uffd import unavailable
from livemig.migration import state
from livemig.migration.destination import Destination
from livemig.migration.source import Source
from livemig.migration.stats import MigrationStats, info_table
from livemig.params import MigrationParameters
from livemig.transport.sockets import SocketPairLink

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")


def postcopy(kind: str, method: str = "none", *, memory: int = 16 << 20, channels: int = 2,
             dst_postcopy: bool = True, **src_kw: Any) -> tuple[MigrationStats, dict[str, Any], list[str]]:
    """Migrate a counter guest that dirties faster than precopy converges (downtime limit 1 ms),
    switching to post-copy after pass 1, its page stream held to 8 MiB/s so that the guest faults
    on pages not sent yet; (source statistics, destination result, statuses seen)."""
    cfg = GuestConfig(kind=kind, memory=memory, workload="counter", dirty_rate=20000, fill="corpus")
    params = MigrationParameters(multifd_channels=channels, multifd_compression=method, max_bandwidth=0,
                                 downtime_limit=1, max_postcopy_bandwidth=8 << 20)
    src_guest, dst_guest = create_guest(cfg), create_guest(cfg, incoming=True)
    link = SocketPairLink()
    dst = Destination(link, params, guest=dst_guest, timeout=10, run_after=0.3, postcopy_ram=dst_postcopy)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    try:
        t.start()
        src_guest.start()
        time.sleep(0.1)
        src = Source(src_guest, link, params, timeout=10, postcopy_ram=True,
                     **{"postcopy_after_passes": 1, **src_kw})
        seen: list[str] = []
        src.status.listeners.append(seen.append)
        stats = src.run()
        if stats.status != "completed":
            dst.cancel()
        t.join(timeout=60)
        assert not t.is_alive()
        return stats, out, seen
    finally:
        src_guest.close()
        dst_guest.close()


def _check_postcopy(stats: MigrationStats, out: dict[str, Any], seen: list[str]) -> None:
    assert stats.status == "completed", stats.error
    assert seen[-3:] == [state.DEVICE, state.POSTCOPY_ACTIVE, state.COMPLETED]
    assert out["status"] == "completed" and out["workload_check"] == "ok"  # the guest went on exactly
    assert out["progress_after"] > 0
    pc = out["postcopy"]
    assert pc["verified"] is True and stats.postcopy is not None and stats.postcopy["verified"] is True
    # every discarded page came once on the main channel, as a page or a zero page
    assert pc["pages-placed"] > 0 and stats.postcopy_bytes >= pc["pages-placed"] * 8
    assert stats.postcopy_requests == pc["pages-requested"] <= pc["faults"]
    assert stats.source_guest == "postmigrate"  # the source never resumes after POSTCOPY_RUN
    q = stats.to_qapi()
    assert q["ram"]["postcopy-requests"] == stats.postcopy_requests
    assert q["ram"]["postcopy-bytes"] == stats.postcopy_bytes
    assert set(q["livemig"]["postcopy"]) == {"time-ms", "pages-requested", "faults", "fault-latency-us", "verified"}
    assert "postcopy request count:" in info_table(q) and "post-copy:" in info_table(q)


@pytest.mark.kvm
@pytest.mark.parametrize("method", ["none", "zlib", "zstd", "qatzip"])
def test_kvm_guest_postcopy_every_method(method: str) -> None:
    stats, out, seen = postcopy("kvm", method)
    _check_postcopy(stats, out, seen)
    assert stats.postcopy_requests > 0  # the running vCPUs faulted on pages not yet sent (through KVM)
    assert stats.postcopy["fault-latency-us"]["p50"] is not None  # type: ignore[index]


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_portable_guest_postcopy(method: str) -> None:
    stats, out, seen = postcopy("portable", method)
    _check_postcopy(stats, out, seen)


@pytest.mark.kvm
def test_postcopy_bandwidth_cap_and_start_postcopy_on_request() -> None:
    # no pass count: the switch comes from start_postcopy() (QMP migrate-start-postcopy)
    cfg = GuestConfig(kind="kvm", memory=16 << 20, workload="counter", dirty_rate=20000, fill="corpus")
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0, downtime_limit=1,
                                 max_postcopy_bandwidth=64 << 20)
    src_guest, dst_guest = create_guest(cfg), create_guest(cfg, incoming=True)
    link = SocketPairLink()
    dst = Destination(link, params, guest=dst_guest, timeout=10, postcopy_ram=True)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    try:
        t.start()
        src_guest.start()
        src = Source(src_guest, link, params, timeout=10, postcopy_ram=True, postcopy_after_passes=None)
        src.status.listeners.append(lambda s: src.start_postcopy() if s == state.ACTIVE else None)
        stats = src.run()
        t.join(timeout=60)
        assert stats.status == "completed", stats.error
        assert stats.postcopy is not None and stats.postcopy["verified"]
        # the cap held the post-copy stream: its bytes took at least bytes / cap seconds
        assert stats.postcopy["time-ms"] >= stats.postcopy_bytes / (64 << 20) * 1000 * 0.9
    finally:
        src_guest.close()
        dst_guest.close()


def test_postcopy_ram_must_be_on_both_sides() -> None:
    stats, out, _ = postcopy("portable", dst_postcopy=False)
    assert stats.status == "failed"
    assert "postcopy-ram differs: source uses on, destination off" in stats.error
    assert stats.source_guest == "running"


def test_start_postcopy_and_resume_refused_in_qemus_words() -> None:
    cfg = GuestConfig(kind="portable", memory=4 << 20, workload="idle")
    guest = create_guest(cfg)
    try:
        plain = Source(guest, SocketPairLink(), MigrationParameters())
        with pytest.raises(Exception, match="^Enable postcopy with migrate_set_capability before the start of "
                                            "migration$"):
            plain.start_postcopy()
        pc = Source(guest, SocketPairLink(), MigrationParameters(), postcopy_ram=True)
        with pytest.raises(Exception, match="^Postcopy must be started after migration has been started$"):
            pc.start_postcopy()
        with pytest.raises(Exception, match="^Cannot resume if there is no paused migration$"):
            pc.resume(SocketPairLink())
        dst = Destination(SocketPairLink(), MigrationParameters(), postcopy_ram=True)
        with pytest.raises(Exception, match=r"^Migrate recover can only be run when postcopy is paused\.$"):
            dst.recover(SocketPairLink())
    finally:
        guest.close()


def test_max_postcopy_bandwidth_checked_in_qemus_words() -> None:
    for bad in (-1, 1 << 64):
        with pytest.raises(Exception, match="^Parameter 'max_postcopy_bandwidth' expects an integer in the range "
                                            "of 0 to 18446744073709551615 bytes/second$"):
            MigrationParameters(max_postcopy_bandwidth=bad).check()
    p = MigrationParameters()
    p.set("max-postcopy-bandwidth", "100M")
    assert p.max_postcopy_bandwidth == 100 << 20 and p.to_qapi()["max-postcopy-bandwidth"] == 100 << 20


def _cut_in_postcopy(kind: str) -> tuple[Source, Destination, Any, Any, threading.Thread, dict[str, Any], list[str]]:
    """A migration whose main channel is shut down 0.3 s into post-copy (its page stream held to
    1 MiB/s, so pages are still missing then); both sides end up postcopy-paused."""
    cfg = GuestConfig(kind=kind, memory=16 << 20, workload="counter", dirty_rate=20000, fill="corpus")
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0, downtime_limit=1,
                                 max_postcopy_bandwidth=1 << 20)
    src_guest, dst_guest = create_guest(cfg), create_guest(cfg, incoming=True)
    link = SocketPairLink()
    dst = Destination(link, params, guest=dst_guest, timeout=5, postcopy_ram=True, run_after=0.3)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    t.start()
    src_guest.start()
    src = Source(src_guest, link, params, timeout=5, postcopy_ram=True, postcopy_after_passes=1)
    seen: list[str] = []

    def cut(status: str) -> None:
        seen.append(status)
        if status == state.POSTCOPY_ACTIVE and state.POSTCOPY_PAUSED not in seen:
            assert src.main is not None
            threading.Timer(0.3, src.main.shutdown, args=(2,)).start()

    src.status.listeners.append(cut)
    return src, dst, src_guest, dst_guest, t, out, seen


def _stop(src: Source, dst: Destination, s: threading.Thread, t: threading.Thread, *guests: Any) -> None:
    """Tear a paused or finished pair down: cancel both, join their threads, wake vCPUs still waiting
    on pages (closing the destination's userfaultfd), so the guests can be closed."""
    src.cancel()
    dst.cancel()
    s.join(timeout=10)
    t.join(timeout=10)
    if dst.postcopy is not None:
        dst.postcopy.close()
    for g in guests:
        g.close()


def _wait_for(what: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["kvm", "portable"])
def test_a_link_cut_in_postcopy_pauses_both_sides_and_recovers_without_losing_a_page(kind: str) -> None:
    src, dst, src_guest, dst_guest, t, out, seen = _cut_in_postcopy(kind)
    result: list[MigrationStats] = []
    s = threading.Thread(target=lambda: result.append(src.run()))
    try:
        s.start()
        _wait_for(lambda: src.status.state == state.POSTCOPY_PAUSED and dst.postcopy_status == state.POSTCOPY_PAUSED)
        assert not src_guest.running  # nothing resumes with holes, nothing runs twice
        with pytest.raises(Exception, match="Migrate recover can only be run when postcopy is paused"):
            Destination(SocketPairLink(), MigrationParameters(), postcopy_ram=True).recover(SocketPairLink())
        again = SocketPairLink()
        dst.recover(again)  # migrate-recover, then migrate ... resume=true
        src.resume(again)
        s.join(timeout=60)
        t.join(timeout=30)
        stats = result[0]
        assert stats.status == "completed", stats.error
        assert seen[-5:] == [state.POSTCOPY_ACTIVE, state.POSTCOPY_PAUSED, state.POSTCOPY_RECOVER,
                             state.POSTCOPY_ACTIVE, state.COMPLETED]
        # every page arrived (the destination checks before it answers) and matches the source's
        assert out["status"] == "completed" and out["postcopy"]["verified"] is True
        assert out["workload_check"] == "ok"  # the guest went on exactly
    finally:
        _stop(src, dst, s, t, src_guest, dst_guest)


@pytest.mark.kvm
def test_a_paused_postcopy_cancelled_fails_with_the_guest_lost() -> None:
    src, dst, src_guest, dst_guest, t, out, _ = _cut_in_postcopy("kvm")
    result: list[MigrationStats] = []
    s = threading.Thread(target=lambda: result.append(src.run()))
    try:
        s.start()
        _wait_for(lambda: src.status.state == state.POSTCOPY_PAUSED and dst.postcopy_status == state.POSTCOPY_PAUSED)
        src.cancel()
        s.join(timeout=30)
        stats = result[0]
        assert stats.status == "failed" and stats.error.startswith("post-copy failed after the switch")
        assert "post-copy paused and cancelled" in stats.error
        assert stats.source_guest == "postmigrate" and not src_guest.running
        dst.cancel()
        t.join(timeout=30)
        assert out["status"] == "failed" and out["resumed"] is True  # it ran, and cannot go on
    finally:
        if dst.postcopy is not None:
            dst.postcopy.close()
        src_guest.close()
        dst_guest.close()


@pytest.mark.kvm
def test_stale_precopy_bytes_are_never_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # a destination whose discards drop nothing would keep the precopy bytes of re-dirtied pages:
    # placing the fresh page then finds it present, and the migration fails on both sides
    from livemig.guest.base import RamBlock

    monkeypatch.setattr(RamBlock, "discard", lambda self, first, n: None)
    stats, out, _ = postcopy("kvm")
    assert stats.status == "failed" and "was present before it was placed" in stats.error
    assert out["status"] == "failed" and "was present before it was placed" in out["error-desc"]


@pytest.mark.kvm
def test_a_stranger_on_the_recovery_listener_is_refused_and_the_source_resumes() -> None:
    """A connection to the recovery listener with another migration's uuid learns nothing and
    changes nothing: the destination stays paused, and the real source resumes after it."""
    import json

    from livemig.migration.protocol import MACHINE_TYPE, RESUME_SECTION, SECTION_CONFIG
    from livemig.wire import stream

    src, dst, src_guest, dst_guest, t, out, seen = _cut_in_postcopy("kvm")
    result: list[MigrationStats] = []
    s = threading.Thread(target=lambda: result.append(src.run()))
    try:
        s.start()
        _wait_for(lambda: src.status.state == state.POSTCOPY_PAUSED and dst.postcopy_status == state.POSTCOPY_PAUSED)
        again = SocketPairLink()
        dst.recover(again)
        stranger = again.connect(5)
        stranger.sendall(stream.file_header() + stream.configuration(MACHINE_TYPE)
                         + stream.section_full(SECTION_CONFIG, RESUME_SECTION, 0, 1)
                         + stream.blob(json.dumps({"uuid": "ab" * 16}).encode())
                         + stream.section_footer(SECTION_CONFIG) + stream.recv_bitmap("pc.ram"))
        stranger.settimeout(5)
        assert stranger.recv(4096) == b""  # closed without a bitmap
        _wait_for(lambda: dst.postcopy_status == state.POSTCOPY_PAUSED)
        assert src.status.state == state.POSTCOPY_PAUSED
        dst.recover(again)
        src.resume(again)
        s.join(timeout=60)
        t.join(timeout=30)
        assert result[0].status == "completed", result[0].error
        assert out["status"] == "completed" and out["postcopy"]["verified"] is True
        assert out["workload_check"] == "ok"
    finally:
        _stop(src, dst, s, t, src_guest, dst_guest)
