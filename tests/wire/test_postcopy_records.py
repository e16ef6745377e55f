"""Post-copy's COMMAND records (docs/wire.md, "Main stream"): written as QEMU lays them out, read
back whole in any chunking, malformed ones refused naming the field."""

from __future__ import annotations

import re

import pytest

from livemig.errors import LocalWireError, WireError
from livemig.wire.stream import (
    NEED_DATA,
    PostcopyAdvise,
    PostcopyDiscard,
    PostcopyListen,
    PostcopyRun,
    StreamReader,
    command,
    file_header,
    postcopy_advise,
    postcopy_listen,
    postcopy_ram_discard,
    postcopy_run,
)


def _events(data: bytes, step: int) -> list[object]:
    r = StreamReader()
    out: list[object] = []
    for i in range(0, len(data), step):
        r.feed(data[i:i + step])
        while (ev := r.next_event()) is not NEED_DATA:
            out.append(ev)
    return out[1:]  # without the header


def test_advise_bytes_as_qemu() -> None:
    # 0x08, be16 3, be16 16, be64 page-size summary, be64 target page size
    assert postcopy_advise(4096, 4096) == bytes.fromhex("08 0003 0010") + (4096).to_bytes(8, "big") * 2


def test_discard_bytes_as_qemu() -> None:
    raw = postcopy_ram_discard("pc.ram", [(0x2000, 0x3000)])
    assert raw == (bytes.fromhex("08 0006") + (3 + 6 + 16).to_bytes(2, "big") + b"\x00\x06pc.ram\x00"
                   + (0x2000).to_bytes(8, "big") + (0x3000).to_bytes(8, "big"))


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_round_trip_any_chunking(step: int) -> None:
    ranges = [(i * 8192, 4096) for i in range(30)]  # 30 ranges: three commands of 12, 12, 6
    data = (file_header() + postcopy_advise(4096, 4096) + postcopy_ram_discard("pc.ram", ranges)
            + postcopy_listen() + postcopy_run())
    evs = _events(data, step)
    assert evs[0] == PostcopyAdvise(4096, 4096)
    discards = [e for e in evs if isinstance(e, PostcopyDiscard)]
    assert [len(d.ranges) for d in discards] == [12, 12, 6]
    assert [r for d in discards for r in d.ranges] == ranges
    assert evs[-2:] == [PostcopyListen(), PostcopyRun()]


def test_advise_zero_length_form() -> None:
    assert _events(file_header() + command(3), 100) == [PostcopyAdvise(0, 0)]


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x01\x01a\x00" + bytes(16), "POSTCOPY_RAM_DISCARD) version: received 1, expected 0"),
    (b"\x00\x01a\x07" + bytes(16), "byte after the RAM block id: received 7, expected 0"),
    (b"\x00\x01a\x00" + bytes(17), "ranges length: received 17"),
    (b"\x00\x01a\x00" + bytes(3), "length: received 7, expected >= 20"),
])
def test_discard_malformed(payload: bytes, message: str) -> None:
    r = StreamReader()
    r.feed(file_header() + command(6, payload))
    r.next_event()
    with pytest.raises(WireError, match=re.escape(message)):
        r.next_event()


def test_listen_with_data_refused() -> None:
    r = StreamReader()
    r.feed(file_header() + command(4, b"x"))
    r.next_event()
    with pytest.raises(WireError, match=re.escape("COMMAND 4 (POSTCOPY_LISTEN) length: received 1, expected 0")):
        r.next_event()


def test_discard_writer_refuses_bad_ranges() -> None:
    with pytest.raises(LocalWireError, match="length 0"):
        postcopy_ram_discard("pc.ram", [(0, 0)])
    assert postcopy_ram_discard("pc.ram", []) == b""


def test_recovery_commands_round_trip() -> None:
    from livemig.wire.stream import PostcopyResume, RecvBitmap, postcopy_resume, recv_bitmap

    assert recv_bitmap("pc.ram") == bytes.fromhex("08 000a 0007 06") + b"pc.ram"  # QEMU: u8 len, id
    assert _events(file_header() + recv_bitmap("pc.ram") + postcopy_resume(), 3) == [RecvBitmap("pc.ram"),
                                                                                     PostcopyResume()]
    r = StreamReader()
    r.feed(file_header() + command(10, b"\x05pc"))
    r.next_event()
    with pytest.raises(WireError, match=re.escape("RECV_BITMAP) id length: received 5, expected 2")):
        r.next_event()
