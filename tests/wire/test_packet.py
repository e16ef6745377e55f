"""MultiFDPacket_t: golden bytes, round trips, decode_packet and check_packet rejections."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from livemig.errors import LocalWireError, WireError
from livemig.ram.pages import runs
from livemig.wire import (
    PacketHeader,
    check_packet,
    decode_packet,
    encode_packet,
    encode_sync,
    packet_len,
    page_count,
)
from livemig.wire.constants import (
    COMPRESSION_MASK,
    FLAG_NOCOMP,
    FLAG_QATZIP,
    FLAG_SYNC,
    FLAG_ZLIB,
    FLAG_ZSTD,
)

PAGE = 4096
LEN = 1344
MiB = 1024 * 1024


def _u64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def _data_packet(**overrides: object) -> bytes:
    args: dict[str, object] = dict(
        flags=FLAG_ZSTD,
        packet_num=7,
        ramblock="pc.ram",
        normal=_u64([0x1000, 0x3000]),
        zero=_u64([0x2000]),
        next_packet_size=0x1234,
    )
    args.update(overrides)
    return encode_packet(**args)  # type: ignore[arg-type]


def _patch(raw: bytes, offset: int, fmt: str, *values: int | bytes) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("page_size", "count", "length"), [(4096, 128, 1344), (8192, 64, 832), (65536, 8, 384)])
def test_sizes(page_size: int, count: int, length: int) -> None:
    assert page_count(page_size) == count
    assert packet_len(page_size) == length


@pytest.mark.parametrize("page_size", [0, -4096, 3000, 1024 * 1024])
def test_bad_page_size(page_size: int) -> None:
    with pytest.raises(LocalWireError, match=f"page size {page_size} does not divide"):
        page_count(page_size)


# --- golden vectors --------------------------------------------------------------------------


def test_golden_sync_packet() -> None:
    # 10.2 SYNC-only packet: magic, version, flags=SYNC, pages_alloc 0, normal 0, next 0, packet_num 5
    expected = bytes.fromhex(
        "11223344" "00000001" "00000001" "00000000" "00000000" "00000000" "0000000000000005"
    ) + bytes(LEN - 32)
    assert encode_sync(5) == expected
    hdr = decode_packet(expected)
    assert hdr.is_sync and not hdr.has_data
    assert (hdr.flags, hdr.pages_alloc, hdr.packet_num, hdr.ramblock) == (1, 0, 5, "")
    assert hdr.offsets.size == 0


def test_golden_data_packet() -> None:
    raw = _data_packet()
    assert len(raw) == LEN
    head = bytes.fromhex(
        "11223344"  # magic
        "00000001"  # version
        "00000004"  # flags: zstd
        "00000080"  # pages_alloc 128
        "00000002"  # normal_pages
        "00001234"  # next_packet_size
        "0000000000000007"  # packet_num
        "00000001"  # zero_pages
    ) + bytes(28)
    assert raw[:64] == head
    assert raw[64:320] == b"pc.ram" + bytes(250)
    offsets = bytes.fromhex("0000000000001000" "0000000000003000" "0000000000002000")
    assert raw[320 : 320 + 24] == offsets
    assert raw[320 + 24 :] == bytes(LEN - 320 - 24)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_normal", "n_zero", "flags"),
    [(0, 0, FLAG_NOCOMP), (1, 0, FLAG_ZLIB), (0, 1, FLAG_ZSTD), (64, 64, FLAG_QATZIP | FLAG_SYNC), (128, 0, 0),
     (0, 128, FLAG_ZLIB), (100, 28, FLAG_ZSTD)],
)
def test_round_trip(n_normal: int, n_zero: int, flags: int) -> None:
    rng = np.random.default_rng(n_normal * 1000 + n_zero)
    pages = rng.permutation(4096)[: n_normal + n_zero].astype(np.uint64) * np.uint64(PAGE)
    normal, zero = pages[:n_normal], pages[n_normal:]
    raw = encode_packet(
        flags=flags, packet_num=2**64 - 1, ramblock="ram-node0", normal=normal, zero=zero,
        next_packet_size=2**32 - 1,
    )
    hdr = decode_packet(raw)
    assert isinstance(hdr, PacketHeader)
    assert (hdr.flags, hdr.pages_alloc, hdr.normal_pages, hdr.zero_pages) == (flags, 128, n_normal, n_zero)
    assert (hdr.packet_num, hdr.next_packet_size) == (2**64 - 1, 2**32 - 1)
    assert hdr.ramblock == ("ram-node0" if n_normal + n_zero else "")
    assert hdr.offsets.dtype == np.uint64 and hdr.offsets.dtype.isnative
    np.testing.assert_array_equal(hdr.normal_offsets, normal)
    np.testing.assert_array_equal(hdr.zero_offsets, zero)
    assert hdr.has_data == bool(n_normal + n_zero)
    assert hdr.is_sync == bool(flags & FLAG_SYNC)
    assert hdr.compression_flag == flags & COMPRESSION_MASK
    check_packet(hdr, method_flag=flags & COMPRESSION_MASK, block_size=4096 * PAGE)


_U64_OFFSETS = st.lists(st.integers(0, 2**64 - 1), max_size=64)


@given(_U64_OFFSETS, _U64_OFFSETS, st.sampled_from([np.uint64, np.int64, list]), st.integers(0, 2**64 - 1))
def test_encode_matches_the_layout_written_field_by_field(
    normal: list[int], zero: list[int], kind: type, packet_num: int
) -> None:
    """encode_packet's bytes equal a packet packed one field and one offset at a time, whatever the
    type the offsets come in (the sender's uint64 arrays, signed arrays, lists)."""
    if kind is not np.uint64:  # numpy takes a list as int64 (float64 past it)
        normal, zero = [o >> 1 for o in normal], [o >> 1 for o in zero]
    as_kind = (lambda v: v) if kind is list else (lambda v: np.array(v, dtype=kind))
    raw = encode_packet(flags=FLAG_ZLIB | FLAG_SYNC, packet_num=packet_num, ramblock="pc.ram", normal=as_kind(normal),
                        zero=as_kind(zero), next_packet_size=99)
    used = len(normal) + len(zero)
    expected = struct.pack(">6IQI28x256s", 0x11223344, 1, FLAG_ZLIB | FLAG_SYNC, 128, len(normal), 99, packet_num,
                           len(zero), b"pc.ram")
    expected += b"".join(struct.pack(">Q", o) for o in normal + zero) + bytes(8 * (128 - used))
    assert raw == expected


def test_round_trip_other_page_size() -> None:
    raw = encode_packet(flags=0, packet_num=1, ramblock="b", normal=_u64(list(range(0, 64 * 8192, 8192))),
                        zero=_u64([]), next_packet_size=0, page_size=8192)
    assert len(raw) == 832
    hdr = decode_packet(raw, page_size=8192)
    assert hdr.normal_pages == 64
    check_packet(hdr, method_flag=0, block_size=64 * 8192, page_size=8192)


def test_encode_accepts_lists_and_signed_arrays() -> None:
    raw = encode_packet(flags=0, packet_num=0, ramblock="b", normal=[0, 4096], zero=np.array([8192], np.int64),
                        next_packet_size=8192)
    np.testing.assert_array_equal(decode_packet(raw).offsets, [0, 4096, 8192])


def test_decode_from_memoryview_slice_and_copies_offsets() -> None:
    buf = bytearray(b"\xee" * 3 + _data_packet() + b"\xee" * 5)
    hdr = decode_packet(memoryview(buf)[3 : 3 + LEN])
    buf[3 + 320 : 3 + 328] = b"\xff" * 8  # reuse of the receive buffer must not change the header
    np.testing.assert_array_equal(hdr.offsets, [0x1000, 0x3000, 0x2000])


def test_padding_and_reserved_fields_ignored() -> None:
    raw = bytearray(_data_packet())
    raw[36:64] = b"\x5a" * 28  # unused fields
    raw[320 + 24 :] = b"\xa5" * (LEN - 320 - 24)  # offset padding (7.2 leaves stale values there)
    raw[64 + 7 : 320] = b"\x77" * (256 - 7)  # bytes after the ramblock's NUL
    hdr = decode_packet(bytes(raw))
    assert hdr.ramblock == "pc.ram"
    np.testing.assert_array_equal(hdr.offsets, [0x1000, 0x3000, 0x2000])


def test_empty_packet_ignores_stale_ramblock() -> None:
    raw = _patch(encode_sync(1), 64, "4s", b"\xff\xfe\x00\x01")
    assert decode_packet(raw).ramblock == ""


def test_ramblock_unterminated_at_255() -> None:
    # byte 255 is forced to NUL: a 256-byte name with no terminator decodes to its first 255 bytes
    raw = _patch(_data_packet(), 64, "256s", b"r" * 256)
    assert decode_packet(raw).ramblock == "r" * 255


def test_ramblock_255_bytes_round_trip() -> None:
    raw = _data_packet(ramblock="x" * 255)
    assert decode_packet(raw).ramblock == "x" * 255


def test_ramblock_not_ascii_rejected() -> None:
    raw = _patch(_data_packet(), 64, "8s", b"pc.\xe9ram\x00")
    with pytest.raises(WireError, match=r"packet ramblock: received b'pc.\\xe9ram', expected ASCII"):
        decode_packet(raw)


# --- decode rejections -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 12, 320, LEN - 1, LEN + 1, 2 * LEN])
def test_wrong_length(size: int) -> None:
    raw = (_data_packet() * 2)[:size]
    with pytest.raises(WireError, match=rf"^multifd: packet length: received {size}, expected 1344$"):
        decode_packet(raw)


def test_bad_magic() -> None:
    with pytest.raises(WireError) as info:
        decode_packet(_patch(_data_packet(), 0, ">I", 0xDEADBEEF))
    assert str(info.value) == "multifd: packet magic: received 0xdeadbeef, expected 0x11223344"


def test_bad_version() -> None:
    with pytest.raises(WireError, match=r"^multifd: packet version: received 3, expected 1$"):
        decode_packet(_patch(_data_packet(), 4, ">I", 3))


@pytest.mark.parametrize("flags", [0x80, 0x100, 0x80000000, FLAG_SYNC | 0x200])
def test_unknown_flag_bits(flags: int) -> None:
    text = rf"packet flags: received {flags:#x}, expected only SYNC and .* \(0x3f\) \(unknown bits\)"
    with pytest.raises(WireError, match=text):
        decode_packet(_patch(_data_packet(), 8, ">I", flags))


def test_device_state_not_supported() -> None:
    with pytest.raises(WireError, match=r"received 0x40, .*\(DEVICE_STATE is not supported\)$"):
        decode_packet(_patch(_data_packet(), 8, ">I", 0x40))


def test_pages_alloc_too_big() -> None:
    with pytest.raises(WireError, match=r"^multifd: packet pages_alloc: received 129, expected <= 128$"):
        decode_packet(_patch(_data_packet(), 12, ">I", 129))


def test_normal_pages_exceed_pages_alloc() -> None:
    raw = _patch(_data_packet(), 12, ">II", 10, 11)
    with pytest.raises(WireError, match="^multifd: packet normal_pages: received 11, expected <= pages_alloc 10$"):
        decode_packet(raw)


def test_zero_pages_exceed_room() -> None:
    raw = _patch(_patch(_data_packet(), 12, ">II", 128, 100), 32, ">I", 29)
    with pytest.raises(WireError, match=r"packet zero_pages: received 29, expected <= pages_alloc - normal_pages 28"):
        decode_packet(raw)
    raw = _patch(raw, 32, ">I", 28)
    assert decode_packet(raw).zero_pages == 28


def test_sync_packet_with_pages_alloc_zero_and_pages_rejected() -> None:
    raw = _patch(encode_sync(1), 16, ">I", 1)
    with pytest.raises(WireError, match="normal_pages: received 1, expected <= pages_alloc 0"):
        decode_packet(raw)


# --- check_packet ----------------------------------------------------------------------------


def test_check_flags_mismatch() -> None:
    hdr = decode_packet(_data_packet(flags=FLAG_ZLIB))
    with pytest.raises(WireError, match=r"^multifd: packet compression flags: received 0x2, expected 0x4$"):
        check_packet(hdr, method_flag=FLAG_ZSTD, block_size=MiB)


def test_check_flags_ignores_sync_bit() -> None:
    check_packet(decode_packet(_data_packet(flags=FLAG_ZSTD | FLAG_SYNC)), method_flag=FLAG_ZSTD, block_size=MiB)


def test_check_skips_packets_without_pages() -> None:
    # SYNC-only packets carry no compression flag; 10.2 only compares flags when there are pages
    check_packet(decode_packet(encode_sync(3)), method_flag=FLAG_ZSTD, block_size=0)
    empty = encode_packet(flags=FLAG_ZLIB, packet_num=1, ramblock="", normal=_u64([]), zero=_u64([]),
                          next_packet_size=0)
    check_packet(decode_packet(empty), method_flag=FLAG_ZSTD, block_size=0)


def test_check_offset_bound() -> None:
    last = MiB - PAGE
    ok = decode_packet(_data_packet(normal=_u64([last]), zero=_u64([0])))
    check_packet(ok, method_flag=FLAG_ZSTD, block_size=MiB)
    for bad in (MiB, last + 8, 2**64 - PAGE):
        hdr = decode_packet(_data_packet(normal=_u64([0]), zero=_u64([bad])))
        text = rf"^multifd: offset in block 'pc.ram' of {MiB} bytes: received {bad}, expected <= {last} \(offset too"
        with pytest.raises(WireError, match=text):
            check_packet(hdr, method_flag=FLAG_ZSTD, block_size=MiB)


def test_check_block_smaller_than_a_page() -> None:
    hdr = decode_packet(_data_packet(normal=_u64([0]), zero=_u64([])))
    with pytest.raises(WireError, match=r"received 0, expected <= -1 \(offset too long\)"):
        check_packet(hdr, method_flag=FLAG_ZSTD, block_size=PAGE - 1)


def test_check_offset_unaligned() -> None:
    hdr = decode_packet(_data_packet(normal=_u64([0, 0x1800]), zero=_u64([])))
    text = r"offset in block .*: received 6144, expected a multiple of 4096 \(not page aligned\)$"
    with pytest.raises(WireError, match=text):
        check_packet(hdr, method_flag=FLAG_ZSTD, block_size=MiB)


@pytest.mark.parametrize(("normal", "zero"), [([0x1000, 0x1000], []), ([0x1000], [0x1000]), ([], [0, 0x5000, 0])])
def test_check_duplicate_offsets(normal: list[int], zero: list[int]) -> None:
    hdr = decode_packet(_data_packet(normal=_u64(normal), zero=_u64(zero)))
    with pytest.raises(WireError, match="listed more than once"):
        check_packet(hdr, method_flag=FLAG_ZSTD, block_size=MiB)


def test_check_returns_the_pages_of_a_consecutive_packet() -> None:
    offsets = list(range(64 * PAGE, 192 * PAGE, PAGE))
    hdr = decode_packet(_data_packet(normal=_u64(offsets[:100]), zero=_u64(offsets[100:])))
    normal, zero, normal_runs, span = check_packet(hdr, method_flag=FLAG_ZSTD, block_size=192 * PAGE)
    np.testing.assert_array_equal(normal, np.arange(64, 164))
    np.testing.assert_array_equal(zero, np.arange(164, 192))
    assert normal.dtype == zero.dtype == np.int64
    assert normal_runs == [(64, 100)] and span == (64, 191)
    # one page past the block: the consecutive packet is refused like any other
    with pytest.raises(WireError, match="offset too long"):
        check_packet(hdr, method_flag=FLAG_ZSTD, block_size=192 * PAGE - 1)


@st.composite
def _offsets(draw: st.DrawFn) -> tuple[list[int], int]:
    """Offsets of a packet, mostly a consecutive run, sometimes bent (a page moved, repeated,
    unaligned, past the block), and how many of them are normal pages."""
    start = draw(st.integers(0, 40))
    n = draw(st.integers(1, 128))
    pages = [(start + i) * PAGE for i in range(n)]
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, n - 1))
        pages[i] = draw(st.sampled_from([pages[i] + 1, pages[0], 170 * PAGE, (start + n + 3) * PAGE,
                                         pages[i] - PAGE * (pages[i] >= PAGE)]))
    if n > 3 and draw(st.booleans()):  # two pages swapped inside the run: first and last unchanged
        i, j = draw(st.integers(1, n - 2)), draw(st.integers(1, n - 2))
        pages[i], pages[j] = pages[j], pages[i]
    if draw(st.booleans()):  # zero pages taken out of the run and listed after the normal ones
        zero = sorted(set(draw(st.lists(st.integers(0, n - 1), max_size=n))))
        normal = [p for i, p in enumerate(pages) if i not in zero]
        return normal + [pages[i] for i in zero], len(normal)
    return pages, draw(st.integers(0, n))


@given(_offsets())
@example(([PAGE + 1], 1))  # one unaligned page
@example(([PAGE + 1, 2 * PAGE + 1], 0))  # a consecutive run, every page unaligned
@example(([0, 2 * PAGE, PAGE, 3 * PAGE], 4))  # first, last and count of a run, out of order
@example(([0, PAGE + 1, 2 * PAGE], 3))  # first, last and count of a run, one page unaligned
@example(([0, PAGE, PAGE, 3 * PAGE], 2))  # first, last and count of a run, one page twice
@example(([0, 2 * PAGE, PAGE], 2))  # a run once sorted: the zero page listed last
@example(([0, 2 * PAGE, PAGE, 2 * PAGE], 2))  # a run once sorted, but for a page listed twice
@example(([0, 2 * PAGE, PAGE + 8], 2))  # a run once sorted, but for an unaligned page
def test_check_matches_the_plain_rules(case: tuple[list[int], int]) -> None:
    """Fast path or not, check_packet accepts exactly the packets whose offsets are inside the block,
    aligned and listed once, and returns offset / page size split at normal_pages."""
    offsets, nn = case
    block = 168 * PAGE
    hdr = decode_packet(_data_packet(normal=_u64(offsets[:nn]), zero=_u64(offsets[nn:])))
    valid = all(o <= block - PAGE and o % PAGE == 0 for o in offsets) and len(set(offsets)) == len(offsets)
    if not valid:
        with pytest.raises(WireError):
            check_packet(hdr, method_flag=FLAG_ZSTD, block_size=block)
        return
    normal, zero, normal_runs, span = check_packet(hdr, method_flag=FLAG_ZSTD, block_size=block)
    assert normal.tolist() == [o // PAGE for o in offsets[:nn]]
    assert zero.tolist() == [o // PAGE for o in offsets[nn:]]
    assert normal_runs == runs(np.array(normal.tolist(), dtype=np.int64))
    assert span == (min(offsets) // PAGE, max(offsets) // PAGE)


# --- encode rejections -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"ramblock": "x" * 256},
        {"ramblock": "pc.räm"},
        {"ramblock": "a\0b"},
        {"flags": 0x40},
        {"flags": 0x100},
        {"normal": _u64(list(range(0, 100 * PAGE, PAGE))), "zero": _u64(list(range(0, 29 * PAGE, PAGE)))},
        {"normal": np.array([-4096], dtype=np.int64)},
        {"normal": np.array([[0]], dtype=np.uint64)},
        {"normal": np.array([0.5])},
        {"packet_num": -1},
        {"packet_num": 2**64},
        {"next_packet_size": 2**32},
    ],
)
def test_encode_rejects(overrides: dict[str, object]) -> None:
    with pytest.raises(LocalWireError):
        _data_packet(**overrides)


def test_encode_sync_rejects_bad_packet_num() -> None:
    with pytest.raises(LocalWireError, match="packet_num -1 does not fit a u64"):
        encode_sync(-1)
