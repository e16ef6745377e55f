"""A hostile or broken peer: the destination fails with an error naming the field, writes nothing
outside guest RAM, and never resumes the guest; the source survives a vanishing destination and
cancels cleanly."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest

from livemig.compress import create_method
from livemig.guest.base import GuestConfig
from livemig.migration import protocol
from livemig.migration.destination import Destination, Stalled
from livemig.migration.handover import ReturnPath
from livemig.migration.multifd_send import SendChannels, SendContext
from livemig.migration.source import MACHINE_TYPE, Source
from livemig.migration.state import FirstFailure
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from livemig.transport.ratelimit import RateLimiter
from livemig.wire import handshake, packet, stream
from livemig.wire.constants import FLAG_ZLIB
from support.fakeguest import FakeGuest

MEM = 4 << 20


def _destination(params: MigrationParameters, timeout: float = 5,
                 mem: int = MEM) -> tuple[Destination, FakeGuest, dict[str, Any], threading.Thread]:
    g = FakeGuest(GuestConfig(memory=mem), incoming=True)
    d = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=g, timeout=timeout)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(d.run()))
    t.start()
    return d, g, out, t


def _hello(port: int, params: MigrationParameters) -> tuple[socket.socket, ReturnPath]:
    main = socket.create_connection(("127.0.0.1", port))
    cfg = {"protocol": protocol.VERSION, "uuid": bytes(16).hex(),
           "guest": json.loads(GuestConfig(memory=MEM).to_json()), "page-size": 4096,
           "multifd-channels": params.multifd_channels, "multifd-compression": params.multifd_compression,
           "blocks": [["pc.ram", MEM]]}
    main.sendall(stream.file_header() + stream.configuration(MACHINE_TYPE)
                 + stream.section_full(1, "livemig/config", 0, 1) + stream.blob(json.dumps(cfg).encode())
                 + stream.section_footer(1))
    rp = ReturnPath(main, "to-source", "destination")
    assert rp.recv(5) == protocol.Ready()
    return main, rp


def _finish(t: threading.Thread, out: dict[str, Any], g: FakeGuest) -> str:
    t.join(timeout=15)
    assert not t.is_alive()
    assert out["status"] == "failed"
    assert g.resumed == 0
    return str(out["error-desc"])


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: packet.encode_packet(flags=0, packet_num=0, ramblock="pc.ram", normal=np.array([MEM], np.uint64),
                                      zero=np.array([], np.uint64), next_packet_size=4096), "offset too long"),
        (lambda: packet.encode_packet(flags=0, packet_num=0, ramblock="nope", normal=np.array([0], np.uint64),
                                      zero=np.array([], np.uint64), next_packet_size=4096), "unknown ram block"),
        (lambda: packet.encode_packet(flags=FLAG_ZLIB, packet_num=0, ramblock="pc.ram",
                                      normal=np.array([0], np.uint64), zero=np.array([], np.uint64),
                                      next_packet_size=4096), "flags"),
        (lambda: packet.encode_packet(flags=0, packet_num=0, ramblock="pc.ram", normal=np.array([4096], np.uint64),
                                      zero=np.array([], np.uint64), next_packet_size=100), "none packet size"),
    ],
)
def test_bad_packet_is_refused_and_ram_untouched(make: Any, needle: str) -> None:
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0)
    d, g, out, t = _destination(params)
    main, rp = _hello(d.port, params)
    ch = socket.create_connection(("127.0.0.1", d.port))
    ch.sendall(handshake.encode_init(bytes(16), 0) + make() + b"\xff" * 4096)
    err = _finish(t, out, g)
    assert needle in err
    assert "multifd channel 0" in err
    assert not g.blocks[0].pages.any()
    main.close()
    ch.close()


def test_corrupt_payload_names_method_channel_packet() -> None:
    params = MigrationParameters(multifd_channels=1, multifd_compression="zlib", max_bandwidth=0)
    d, g, out, t = _destination(params)
    main, rp = _hello(d.port, params)
    ch = socket.create_connection(("127.0.0.1", d.port))
    junk = b"\x78\x01" + bytes(range(256)) * 4
    hdr = packet.encode_packet(flags=FLAG_ZLIB, packet_num=7, ramblock="pc.ram", normal=np.array([0], np.uint64),
                               zero=np.array([], np.uint64), next_packet_size=len(junk))
    ch.sendall(handshake.encode_init(bytes(16), 0) + hdr + junk)
    err = _finish(t, out, g)
    assert "zlib" in err and "multifd channel 0" in err and "packet 7" in err
    main.close()
    ch.close()


def test_cancel_leaves_the_source_guest_running() -> None:
    params = MigrationParameters(multifd_channels=2, max_bandwidth=2 << 20)  # 2 MiB/s: slow on purpose
    d, g, out, t = _destination(params)
    src_guest = FakeGuest(GuestConfig(memory=MEM, seed=1))
    src_guest.start()
    src = Source(src_guest, parse_address(f"tcp:127.0.0.1:{d.port}"), params, timeout=5)
    threading.Timer(0.3, src.cancel).start()
    t0 = time.monotonic()
    stats = src.run()
    assert time.monotonic() - t0 < 5
    assert stats.status == "cancelled"
    assert src_guest.running
    t.join(timeout=15)
    assert out["status"] == "failed" and g.resumed == 0


def test_vanishing_destination_fails_the_source_in_bounded_time() -> None:
    params = MigrationParameters(multifd_channels=2, max_bandwidth=2 << 20)
    d, g, out, t = _destination(params)
    src_guest = FakeGuest(GuestConfig(memory=MEM, seed=1))
    src_guest.start()
    src = Source(src_guest, parse_address(f"tcp:127.0.0.1:{d.port}"), params, timeout=5)

    def vanish() -> None:
        main = d.main
        d.fail(RuntimeError("killed"), "test")
        if main is not None:
            with contextlib.suppress(OSError):  # the destination may have closed it already
                main.shutdown(socket.SHUT_RDWR)

    threading.Timer(0.3, vanish).start()
    t0 = time.monotonic()
    stats = src.run()
    assert time.monotonic() - t0 < 6
    assert stats.status == "failed" and stats.error
    assert src_guest.running
    t.join(timeout=15)


def test_long_pass_is_not_a_timeout() -> None:
    """A pass longer than the timeout (slow cap) completes: only a channel that stops moving fails."""
    params = MigrationParameters(multifd_channels=2, max_bandwidth=3 << 20)
    g = FakeGuest(GuestConfig(memory=MEM), incoming=True)
    d = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=g, timeout=0.5)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(d.run()))
    t.start()
    src_guest = FakeGuest(GuestConfig(memory=MEM, seed=1))
    src_guest.start()
    t0 = time.monotonic()
    stats = Source(src_guest, parse_address(f"tcp:127.0.0.1:{d.port}"), params, timeout=0.5).run()
    t.join(timeout=15)
    assert stats.status == "completed", stats.error
    assert time.monotonic() - t0 > 0.5  # the pass really was longer than the timeout
    assert out["status"] == "completed"
    assert np.array_equal(src_guest.blocks[0].pages, g.blocks[0].pages)


def test_stalled_source_fails_the_destination_in_bounded_time() -> None:
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0)
    g = FakeGuest(GuestConfig(memory=MEM), incoming=True)
    d = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=g, timeout=0.5)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(d.run()))
    t.start()
    main, rp = _hello(d.port, params)
    ch = socket.create_connection(("127.0.0.1", d.port))
    ch.sendall(handshake.encode_init(bytes(16), 0))  # then nothing more, sockets left open
    t0 = time.monotonic()
    err = _finish(t, out, g)
    assert time.monotonic() - t0 < 5
    # the watchdog, the channel's read or the main stream's read notices first
    assert any(w in err for w in ("no progress", "timed out reading packet header"))
    main.close()
    ch.close()


def test_a_probe_that_connects_and_closes_does_not_end_the_wait() -> None:
    params = MigrationParameters(multifd_channels=2, max_bandwidth=0)
    g = FakeGuest(GuestConfig(memory=MEM), incoming=True)
    d = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=g, timeout=5)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(d.run()))
    t.start()
    socket.create_connection(("127.0.0.1", d.port)).close()
    src_guest = FakeGuest(GuestConfig(memory=MEM, seed=2))
    stats = Source(src_guest, parse_address(f"tcp:127.0.0.1:{d.port}"), params, timeout=5).run()
    t.join(timeout=15)
    assert stats.status == "completed", stats.error
    assert out["status"] == "completed"


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_unsorted_offsets_land_on_their_own_pages(method: str) -> None:
    """QEMU reorders a packet's offsets (zero pages swapped to the end): page i goes to offset[i]."""
    from livemig.compress import create_method

    params = MigrationParameters(multifd_channels=1, multifd_compression=method, max_bandwidth=0)
    d, g, out, t = _destination(params)
    main, rp = _hello(d.port, params)
    ch = socket.create_connection(("127.0.0.1", d.port))
    order = [3, 5, 4, 6]
    data = b"".join(bytes([p]) * 4096 for p in order)
    m = create_method(method)
    payload = b"".join(bytes(b) for b in m.compressor(0).compress([data]))
    hdr = packet.encode_packet(flags=m.flag, packet_num=0, ramblock="pc.ram",
                               normal=np.array(order, np.uint64) * 4096, zero=np.array([], np.uint64),
                               next_packet_size=len(payload))
    ch.sendall(handshake.encode_init(bytes(16), 0) + hdr + payload + packet.encode_sync(1))
    deadline = time.monotonic() + 5
    while not g.blocks[0].pages[6].any() and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in order:
        assert (g.blocks[0].pages[p] == p).all(), f"page {p}"
    main.close()
    ch.close()
    t.join(timeout=15)


def test_packets_slower_than_the_timeout_complete_under_a_cap() -> None:
    """Progress is bytes, not packets: at 512 KiB/s one 512 KiB packet takes 1 s, twice the timeout,
    yet data flows the whole time, so neither side calls it a stall."""
    params = MigrationParameters(multifd_channels=1, max_bandwidth=512 << 10)
    mem = 1 << 20
    d, g, out, t = _destination(params, timeout=0.5, mem=mem)
    src_guest = FakeGuest(GuestConfig(memory=mem, seed=1))
    src_guest.start()
    stats = Source(src_guest, parse_address(f"tcp:127.0.0.1:{d.port}"), params, timeout=0.5).run()
    t.join(timeout=15)
    assert stats.status == "completed", stats.error
    assert out["status"] == "completed", out.get("error-desc")
    assert np.array_equal(src_guest.blocks[0].pages, g.blocks[0].pages)


@pytest.mark.parametrize("where", ["payload", "main"])
def test_a_peer_dribbling_bytes_fails_in_bounded_time(where: str) -> None:
    """A byte every 0.3 s is data, but less than a page per timeout: the destination fails anyway."""
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0)
    d, g, out, t = _destination(params, timeout=1.0)
    main, rp = _hello(d.port, params)
    ch = socket.create_connection(("127.0.0.1", d.port))
    hdr = packet.encode_packet(flags=0, packet_num=0, ramblock="pc.ram", normal=np.array([0], np.uint64),
                               zero=np.array([], np.uint64), next_packet_size=4096)
    ch.sendall(handshake.encode_init(bytes(16), 0) + (hdr if where == "payload" else b""))
    sink = ch if where == "payload" else main
    data = b"\x01" * 4096 if where == "payload" else stream.section_start(2, "ram", 0, 4) + bytes(64)
    t0 = time.monotonic()
    for b in data:
        if not t.is_alive():
            break
        with contextlib.suppress(OSError):
            sink.send(bytes([b]))
        time.sleep(0.3)
    err = _finish(t, out, g)
    assert time.monotonic() - t0 < 5
    assert "no progress" in err, err
    main.close()
    ch.close()


def test_progress_needs_a_page_since_the_last_one() -> None:
    d = Destination(parse_address("tcp:127.0.0.1:0"), MigrationParameters(multifd_channels=1), timeout=1.0)
    try:
        d.last_progress = 0.0
        for _ in range(4095):
            d._progress(1)  # a dribbler: 4095 bytes are not progress yet
        assert d.last_progress == 0.0
        d._progress(1)
        assert d.last_progress > 0.0
        stamp = d.last_progress
        d._progress(4095)  # the count restarted at the last progress
        assert d.last_progress == stamp
    finally:
        d.listener.close()


def test_the_destinations_reason_leads_the_sources_error() -> None:
    """The destination fails on its own and says why (Failed); the source's broken pipe is only the
    symptom: its error leads with the destination's reason."""
    params = MigrationParameters(multifd_channels=2, max_bandwidth=2 << 20)
    d, g, out, t = _destination(params)
    src_guest = FakeGuest(GuestConfig(memory=MEM, seed=1))
    src_guest.start()
    src = Source(src_guest, parse_address(f"tcp:127.0.0.1:{d.port}"), params, timeout=5)
    threading.Timer(0.3, lambda: d.fail(Stalled("out of patience"), "destination")).start()
    stats = src.run()
    t.join(timeout=15)
    assert stats.status == "failed"
    assert stats.error.startswith("destination: out of patience"), stats.error
    assert stats.error.count("destination") == 1, stats.error
    assert src_guest.running


def test_a_broken_channel_is_named_once() -> None:
    """The channel's name comes from where it failed, once: not again from what it was writing."""
    mine, theirs = socket.socketpair()
    theirs.close()
    errors: list[tuple[int, BaseException]] = []
    ctx = SendContext(uuid=bytes(16), page_size=4096, method=create_method("none", 0, 4096), views={},
                      pages64=None, limiter=RateLimiter(0), failed=lambda cid, exc: errors.append((cid, exc)))
    ok, peer = socket.socketpair()
    chans = SendChannels(ctx, check=lambda: None, timeout=5, threads=1)  # one thread writes both channels
    chans.add(ok)  # channel 0: its handshake goes through
    chans.add(mine)  # channel 1: the handshake meets a closed peer
    chans.stop()
    chans.close()
    peer.close()
    assert len(errors) == 1, errors
    failure = FirstFailure()
    failure.record(errors[0][1], f"multifd channel {errors[0][0]}")
    text = str(failure.error)
    assert text.startswith("multifd channel 1: connection failed while writing the handshake"), text
    assert text.count("channel") == 1


def test_a_truncated_payload_names_its_packet_once() -> None:
    params = MigrationParameters(multifd_channels=1, max_bandwidth=0)
    d, g, out, t = _destination(params)
    main, rp = _hello(d.port, params)
    ch = socket.create_connection(("127.0.0.1", d.port))
    hdr = packet.encode_packet(flags=0, packet_num=7, ramblock="pc.ram", normal=np.array([0, 4096], np.uint64),
                               zero=np.array([], np.uint64), next_packet_size=8192)
    ch.sendall(handshake.encode_init(bytes(16), 0) + hdr + b"\x01" * 5000)
    ch.close()
    err = _finish(t, out, g)
    assert "multifd channel 0, packet 7: connection closed after" in err, err
    assert err.count("packet 7") == 1 and err.count("channel 0") == 1, err
    main.close()
