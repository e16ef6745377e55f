"""qatzip: the GZIP_EXT member format, lying payloads, and cross-decoding with the real libqatzip."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from livemig.accel.sample import sample_pages
from livemig.compress import create_method, libqatzip
from livemig.compress.qatzip import LEVEL_MAP, MEMBER_INPUT, QZ_HEADER_SIZE, decode_members, member_header
from livemig.errors import MethodUnavailable, PayloadError

PAGE = 4096


def _payload(data: bytes, level: int = 1) -> bytes:
    send = create_method("qatzip", level).compressor(0)
    return b"".join(bytes(b) for b in send.compress([data]))


def _decode(payload: bytes, pages: int) -> bytes:
    return bytes(create_method("qatzip", 1).decompressor(0).decompress(payload, pages))


def _members(payload: bytes) -> list[tuple[int, int, int]]:
    """(offset, src_sz, dest_sz) of each QZ member."""
    out = []
    pos = 0
    while pos < len(payload):
        src, dest = struct.unpack_from("<II", payload, pos + 16)
        out.append((pos, src, dest))
        pos += QZ_HEADER_SIZE + dest + 8
    return out


# --- golden vectors ----------------------------------------------------------------------------------

def test_golden_member_header() -> None:
    # QATzip qzGzipHeaderExt_T as the hardware writes it: FLG=FEXTRA, MTIME 0, XFL 0, OS 255, XLEN 12,
    # subfield 'QZ' of 8 bytes: src_sz, dest_sz (little-endian)
    assert member_header(0x10000, 0x1234).hex() == "1f8b08040000000000ff0c00515a08000000010034120000"


def test_golden_zero_page() -> None:
    payload = _payload(bytes(PAGE))
    assert payload[:20].hex() == "1f8b08040000000000ff0c00515a080000100000"
    dest = int.from_bytes(payload[20:24], "little")
    assert len(payload) == QZ_HEADER_SIZE + dest + 8
    # trailer: CRC32 of 4096 zero bytes, ISIZE 4096
    assert payload[-8:].hex() == "1100" "1cc7" "00100000"
    assert zlib.decompress(payload[24:-8], -15) == bytes(PAGE)


def test_golden_decode_stored_member() -> None:
    # a hand-written member: QZ header, one stored deflate block, CRC32 0x83584554, ISIZE 4096
    data = b"livemig!" * 512
    payload = bytes.fromhex("1f8b08040000000000ff0c00515a080000100000" "05100000" "010010ffef") + data + bytes.fromhex(
        "54455883" "00100000"
    )
    assert _decode(payload, 1) == data


def test_members_are_64k_slices() -> None:
    data = sample_pages(128, "corpus", seed=3)
    payload = _payload(data)
    members = _members(payload)
    assert [m[1] for m in members] == [MEMBER_INPUT] * 8
    assert sum(QZ_HEADER_SIZE + d + 8 for _, _, d in members) == len(payload)
    assert gzip.decompress(payload) == data  # any gzip reader handles the member sequence
    # 37 pages: two full members and one of 5 pages
    assert [m[1] for m in _members(_payload(data[: 37 * PAGE]))] == [MEMBER_INPUT, MEMBER_INPUT, 5 * PAGE]


def test_levels_compress_no_worse() -> None:
    data = sample_pages(256, "corpus", seed=5)
    sizes = [len(_payload(data, level)) for level in sorted(LEVEL_MAP)]
    # the level map is monotone on the Silesia mix (module docstring); on other data neighbours may
    # differ by a few bytes (zlib 9 vs 8 here: +4 bytes of 277 KB), never by more than 0.1 %
    for lower, higher in zip(sizes, sizes[1:], strict=False):
        assert higher <= lower * 1.001, sizes
    assert sizes[-1] < sizes[2] < sizes[0], sizes


# --- the receiver -------------------------------------------------------------------------------------

def test_accepts_standard_gzip_members() -> None:
    data = sample_pages(20, "mixed", seed=1)
    one = gzip.compress(data, mtime=0)
    assert _decode(one, 20) == data
    split = gzip.compress(data[: 3 * PAGE], mtime=0) + gzip.compress(data[3 * PAGE :], mtime=0)
    assert _decode(split, 20) == data
    # FNAME, FCOMMENT and FHCRC fields are parsed and skipped
    hdr = bytes([0x1F, 0x8B, 8, 8 | 16 | 2, 0, 0, 0, 0, 0, 255]) + b"name\0comment\0" + b"\0\0"
    body = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw = body.compress(data) + body.flush()
    assert _decode(hdr + raw + struct.pack("<II", zlib.crc32(data), len(data)), 20) == data


def _patch(payload: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(payload)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


LYING = {
    "magic": lambda p, m: _patch(p, 0, "<B", 0x1E),
    "method": lambda p, m: _patch(p, 2, "<B", 7),
    "reserved flag": lambda p, m: _patch(p, 3, "<B", 0x24),
    "src_sz too small": lambda p, m: _patch(p, 16, "<I", m[0][1] - 1),
    "src_sz too big": lambda p, m: _patch(p, 16, "<I", 0xFFFFFFFF),
    "dest_sz too small": lambda p, m: _patch(p, 20, "<I", m[0][2] - 1),
    "dest_sz too big": lambda p, m: _patch(p, 20, "<I", m[0][2] + 1),
    "dest_sz huge": lambda p, m: _patch(p, 20, "<I", 0x7FFFFFFF),
    "crc": lambda p, m: _patch(p, QZ_HEADER_SIZE + m[0][2], "<I", 0),
    "isize": lambda p, m: _patch(p, QZ_HEADER_SIZE + m[0][2] + 4, "<I", 1),
    "xlen": lambda p, m: _patch(p, 10, "<H", 0xFFFF),
    "subfield len": lambda p, m: _patch(p, 14, "<H", 4),
    "extra member": lambda p, m: p + p[: QZ_HEADER_SIZE + m[0][2] + 8],
    "stray byte": lambda p, m: p + b"\0",
    "truncated trailer": lambda p, m: p[:-3],
    "truncated header": lambda p, m: p[: m[-1][0] + 7],
}


@pytest.mark.parametrize("lie", sorted(LYING))
def test_rejects_lying_payload(lie: str) -> None:
    data = sample_pages(20, "corpus", seed=2)
    payload = _payload(data)
    bad = LYING[lie](payload, _members(payload))
    with pytest.raises(PayloadError, match="qatzip"):
        _decode(bad, 20)


def test_never_inflates_past_the_packet() -> None:
    # a member that claims 1 page but inflates to 128 pages: refused without producing them
    big = zlib.compressobj(9, zlib.DEFLATED, -15)
    raw = big.compress(bytes(128 * PAGE)) + big.flush()
    payload = member_header(PAGE, len(raw)) + raw + struct.pack("<II", 0, PAGE)
    with pytest.raises(PayloadError, match="exceeds|more than"):
        _decode(payload, 1)
    plain = gzip.compress(bytes(128 * PAGE))
    with pytest.raises(PayloadError, match="more than"):
        decode_members(memoryview(plain), PAGE)


# --- the real libqatzip (software mode without a QAT device) ---------------------------------------------

def _qz_session(level: int) -> libqatzip.QzSession:
    try:
        return libqatzip.QzSession(level)
    except MethodUnavailable:
        pytest.skip("libqatzip.so.3 not found: run scripts/fetch-qatzip")


@pytest.mark.qatzip_lib
@pytest.mark.parametrize("level", [1, 9])
def test_libqatzip_decodes_ours(level: int) -> None:
    sess = _qz_session(level)
    for kind, pages in (("corpus", 128), ("mixed", 37), ("zero", 1), ("random", 3)):
        data = sample_pages(pages, kind, seed=level)
        assert sess.decompress(_payload(data, level), len(data)) == data, kind


@pytest.mark.qatzip_lib
@pytest.mark.parametrize("level", [1, 9])
def test_we_decode_libqatzip(level: int) -> None:
    sess = _qz_session(level)
    recv = create_method("qatzip", level).decompressor(0)
    for kind, pages in (("corpus", 128), ("mixed", 37), ("zero", 1), ("random", 3)):
        data = sample_pages(pages, kind, seed=level)
        theirs = sess.compress(data)
        assert theirs[:4] == b"\x1f\x8b\x08\x04" and theirs[12:16] == b"QZ\x08\x00", theirs[:24].hex()
        assert bytes(recv.decompress(theirs, pages)) == data, kind


@pytest.mark.qatzip_lib
def test_libqatzip_session_recovers_after_bad_input() -> None:
    sess = _qz_session(1)
    data = sample_pages(8, "corpus", seed=9)
    good = _payload(data)
    with pytest.raises(libqatzip.QatzipError):
        sess.decompress(good[: len(good) // 2], len(data))
    with pytest.raises(libqatzip.QatzipError):
        sess.decompress(good, len(data) - 1)
    assert sess.decompress(good, len(data)) == data
    assert not sess.hardware()


@pytest.mark.qatzip_lib
@pytest.mark.parametrize("level", [1, 9])
def test_library_path_in_migration_objects(monkeypatch: pytest.MonkeyPatch, level: int) -> None:
    # the path used with a QAT device, run here in libqatzip's software mode: several packets on one
    # channel, cross-checked against the CPU path's receiver and sender
    _qz_session(level).close()
    monkeypatch.setenv("LIVEMIG_QATZIP", "lib")
    lib = create_method("qatzip", level)
    assert "software mode" in lib.backend() and not lib.accelerated()
    monkeypatch.setenv("LIVEMIG_QATZIP", "cpu")
    cpu = create_method("qatzip", level)
    lib_send, lib_recv = lib.compressor(0), lib.decompressor(0)
    cpu_send, cpu_recv = cpu.compressor(0), cpu.decompressor(0)
    for k, (kind, pages) in enumerate((("corpus", 128), ("mixed", 37), ("zero", 1), ("random", 2))):
        data = sample_pages(pages, kind, seed=k)
        theirs = b"".join(bytes(b) for b in lib_send.compress([data[:PAGE], data[PAGE:]]))
        ours = b"".join(bytes(b) for b in cpu_send.compress([data]))
        assert bytes(cpu_recv.decompress(theirs, pages)) == data
        assert bytes(lib_recv.decompress(ours, pages)) == data
        with pytest.raises(PayloadError, match="qatzip"):
            lib_recv.decompress(ours[:-9], pages)
    assert bytes(lib_recv.decompress(ours, pages)) == data  # the session recovered
    # every lie the CPU receiver refuses, the library receiver refuses too
    data = sample_pages(20, "corpus", seed=2)
    payload = b"".join(bytes(b) for b in cpu_send.compress([data]))
    for lie, make in LYING.items():
        with pytest.raises(PayloadError, match="qatzip"):
            lib_recv.decompress(make(payload, _members(payload)), 20)
            pytest.fail(f"library receiver accepted: {lie}")
    assert bytes(lib_recv.decompress(payload, 20)) == data


def test_backend_mode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_QATZIP", "cpu")
    m = create_method("qatzip", 1)
    assert m.backend().startswith("cpu: ISA-L") and "not probed" in m.backend()
    monkeypatch.setenv("LIVEMIG_QATZIP", "gpu")
    with pytest.raises(Exception, match="LIVEMIG_QATZIP is 'gpu'"):
        create_method("qatzip", 1)
