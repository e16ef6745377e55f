"""MultiFDInit_t: golden bytes, round trips and every rejection, in QEMU's check order."""

from __future__ import annotations

import struct

import pytest

from livemig.errors import LocalWireError, WireError
from livemig.wire import INIT_SIZE, MultiFDInit, decode_init, encode_init

UUID = bytes(range(0x10, 0x20))

# Hand-assembled from the table in docs/wire.md, "Multifd handshake": magic, version, uuid, id 3, 7 + 32 zero bytes.
GOLDEN = bytes.fromhex(
    "11223344"
    "00000001"
    "101112131415161718191a1b1c1d1e1f"
    "03"
    "00000000000000"
    + "00" * 32
)


def test_golden_bytes() -> None:
    assert len(GOLDEN) == INIT_SIZE == 64
    assert encode_init(UUID, 3) == GOLDEN
    assert decode_init(GOLDEN, expected_uuid=UUID, channels=4) == MultiFDInit(uuid=UUID, channel_id=3)


@pytest.mark.parametrize("channels", [1, 2, 8, 256])
def test_round_trip_every_channel(channels: int) -> None:
    for channel_id in range(channels):
        raw = encode_init(UUID, channel_id)
        got = decode_init(raw, expected_uuid=UUID, channels=channels)
        assert got.channel_id == channel_id and got.uuid == UUID


def test_accepts_bytearray_and_memoryview_slice() -> None:
    big = bytearray(b"\xff" * 10 + encode_init(UUID, 1) + b"\xff" * 10)
    view = memoryview(big)[10 : 10 + INIT_SIZE]
    assert decode_init(view, expected_uuid=UUID, channels=2).channel_id == 1
    assert decode_init(bytearray(view), expected_uuid=UUID, channels=2).channel_id == 1


def test_reserved_bytes_are_not_checked() -> None:
    # QEMU never reads unused1/unused2; neither do we.
    raw = bytearray(encode_init(UUID, 0))
    raw[25:64] = b"\xaa" * 39
    assert decode_init(bytes(raw), expected_uuid=UUID, channels=1).channel_id == 0


def test_zero_uuid_when_no_uuid_given() -> None:
    raw = encode_init(bytes(16), 0)
    assert raw[8:24] == bytes(16)
    assert decode_init(raw, expected_uuid=bytes(16), channels=1).uuid == bytes(16)


@pytest.mark.parametrize("size", [*range(0, INIT_SIZE), INIT_SIZE + 1, INIT_SIZE + 64])
def test_wrong_length_rejected(size: int) -> None:
    # every truncation, and trailing bytes: the caller must hand over exactly one record
    raw = (GOLDEN * 3)[:size]
    with pytest.raises(WireError, match=rf"^multifd: initial packet length: received {size}, expected 64$"):
        decode_init(raw, expected_uuid=UUID, channels=4)


def _patched(offset: int, fmt: str, value: int) -> bytes:
    raw = bytearray(GOLDEN)
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


def test_bad_magic() -> None:
    with pytest.raises(WireError) as info:
        decode_init(_patched(0, ">I", 0xDEADBEEF), expected_uuid=UUID, channels=4)
    assert str(info.value) == "multifd: packet magic: received 0xdeadbeef, expected 0x11223344"
    assert info.value.value == 0xDEADBEEF and info.value.expected == 0x11223344


def test_bad_version() -> None:
    with pytest.raises(WireError, match=r"^multifd: packet version: received 2, expected 1$"):
        decode_init(_patched(4, ">I", 2), expected_uuid=UUID, channels=4)


def test_bad_uuid_names_what_came_but_not_the_secret() -> None:
    other = bytes(16)
    with pytest.raises(WireError) as info:
        decode_init(GOLDEN, expected_uuid=other, channels=4)
    text = str(info.value)
    assert text == (
        "multifd: uuid on channel 3: received '10111213-1415-1617-1819-1a1b1c1d1e1f', "
        "expected this destination's uuid"
    )
    assert "00000000-0000" not in text


@pytest.mark.parametrize("channel_id", [4, 5, 255])
def test_channel_id_out_of_range(channel_id: int) -> None:
    # id == channels is rejected too (QEMU's `>` comparison would let it through)
    raw = _patched(24, ">B", channel_id)
    with pytest.raises(WireError, match=rf"channel id: received {channel_id}, expected < 4"):
        decode_init(raw, expected_uuid=UUID, channels=4)


def test_checks_run_in_qemu_order() -> None:
    raw = bytearray(GOLDEN)
    struct.pack_into(">II", raw, 0, 1, 9)  # bad magic and version
    raw[24] = 200  # bad id
    with pytest.raises(WireError, match="magic"):
        decode_init(bytes(raw), expected_uuid=bytes(16), channels=4)
    struct.pack_into(">I", raw, 0, 0x11223344)
    with pytest.raises(WireError, match="version"):
        decode_init(bytes(raw), expected_uuid=bytes(16), channels=4)
    struct.pack_into(">I", raw, 4, 1)
    with pytest.raises(WireError, match="uuid"):
        decode_init(bytes(raw), expected_uuid=bytes(16), channels=4)
    with pytest.raises(WireError, match="channel id: received 200"):
        decode_init(bytes(raw), expected_uuid=UUID, channels=4)


@pytest.mark.parametrize(("uuid", "channel_id"), [(bytes(15), 0), (bytes(17), 0), (UUID, -1), (UUID, 256)])
def test_encode_rejects_bad_arguments(uuid: bytes, channel_id: int) -> None:
    with pytest.raises(LocalWireError):
        encode_init(uuid, channel_id)


@pytest.mark.parametrize(("expected_uuid", "channels"), [(bytes(8), 2), (UUID, 0), (UUID, 257)])
def test_decode_rejects_bad_arguments(expected_uuid: bytes, channels: int) -> None:
    with pytest.raises(LocalWireError):
        decode_init(GOLDEN, expected_uuid=expected_uuid, channels=channels)
