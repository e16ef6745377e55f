"""qpl and uadk: the BE u32 length table, per-page encodings, lying tables, golden bytes."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from livemig.accel.sample import sample_pages
from livemig.compress import create_method
from livemig.errors import PayloadError

PAGE = 4096
TEXT = b"livemig!" * 512  # one page, highly compressible
RANDOM = random.Random(0).randbytes(PAGE)
DEFLATED_TEXT = "edc5b10900300800b05b7a9c144157eff70f4996544e74fe57b66ddbb66dfbec0b"


def _payload(name: str, data: bytes) -> bytes:
    return b"".join(bytes(b) for b in create_method(name).compressor(0).compress([data]))


def _decode(name: str, payload: bytes, pages: int) -> bytes:
    return bytes(create_method(name).decompressor(0).decompress(payload, pages))


def _table(payload: bytes, pages: int) -> list[int]:
    return list(struct.unpack_from(f">{pages}I", payload))


# --- golden vectors ----------------------------------------------------------------------------------

def test_golden_qpl() -> None:
    payload = _payload("qpl", TEXT + RANDOM)
    lens = _table(payload, 2)
    assert lens[1] == PAGE  # does not shrink: sent raw
    assert payload[:8] == struct.pack(">II", lens[0], PAGE) and 0 < lens[0] < PAGE
    body = payload[8 : 8 + lens[0]]
    # raw deflate that a 4 KiB-window inflater (QPL/IAA's limit) accepts
    assert zlib.decompress(body, -12) == TEXT
    assert payload[8 + lens[0] :] == RANDOM
    # a fixed payload: page 0 as 33 bytes of raw deflate (zlib 1.2.13 level 9, window 4 KiB), page 1 raw
    hand = bytes.fromhex("00000021" "00001000" + DEFLATED_TEXT) + RANDOM
    assert _decode("qpl", hand, 2) == TEXT + RANDOM


def test_golden_uadk() -> None:
    payload = _payload("uadk", TEXT + RANDOM)
    lens = _table(payload, 2)
    assert lens[1] == PAGE
    body = payload[8 : 8 + lens[0]]
    # HiSilicon's fixed zlib header, adler32 of the page big-endian at the end
    assert body[:2] == b"\x78\x9c"
    assert body[-4:] == bytes.fromhex("31981c5b")
    assert zlib.decompress(body) == TEXT
    assert zlib.decompress(body[2:-4], -12) == TEXT  # 4 KiB window
    hand = bytes.fromhex("00000027" "00001000" "789c" + DEFLATED_TEXT + "31981c5b") + RANDOM
    assert _decode("uadk", hand, 2) == TEXT + RANDOM


def test_golden_stream_methods() -> None:
    # zlib: a zlib stream header for level 1 (78 01) and a sync flush at the packet end
    z = _payload("zlib", TEXT)
    assert z[:2] == b"\x78\x01" and z[-4:] == b"\x00\x00\xff\xff"
    # zstd: the frame magic 28 b5 2f fd opens the channel's first packet
    assert _payload("zstd", TEXT)[:4] == bytes.fromhex("28b52ffd")
    # none: the page itself
    assert _payload("none", TEXT) == TEXT


def test_uadk_raw_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_UADK", "raw")
    method = create_method("uadk")
    assert "raw" in method.backend()
    payload = b"".join(bytes(b) for b in method.compressor(0).compress([TEXT + RANDOM]))
    assert payload == struct.pack(">II", PAGE, PAGE) + TEXT + RANDOM
    assert _decode("uadk", payload, 2) == TEXT + RANDOM


# --- lying tables ------------------------------------------------------------------------------------

def _three() -> bytes:
    return TEXT + RANDOM + bytes(PAGE)


def _lie(payload: bytes, entry: int, value: int) -> bytes:
    b = bytearray(payload)
    struct.pack_into(">I", b, 4 * entry, value)
    return bytes(b)


@pytest.mark.parametrize("name", ["qpl", "uadk"])
@pytest.mark.parametrize(
    ("lie", "match"),
    [
        (lambda p: _lie(p, 0, PAGE + 1), "length 4097"),
        (lambda p: _lie(p, 2, 0), "length 0"),
        (lambda p: _lie(p, 0, struct.unpack_from(">I", p)[0] + 1), "adds up"),
        (lambda p: _lie(p, 2, 0xFFFFFFFF), "length 4294967295"),
        (lambda p: p[:8], "cannot hold"),
        (lambda p: p + b"\0", "adds up"),
        (lambda p: p[:-1], "adds up"),
        # move a byte from page 0's entry to page 2's: sizes add up, but page 0 is cut short
        (lambda p: _lie(_lie(p, 0, struct.unpack_from(">I", p)[0] - 1), 2, struct.unpack_from(">I", p, 8)[0] + 1),
         "page 0"),
    ],
)
def test_rejects_lying_table(name: str, lie: object, match: str) -> None:
    payload = _payload(name, _three())
    with pytest.raises(PayloadError, match=f"^{name}: .*{match}"):
        _decode(name, lie(payload), 3)  # type: ignore[operator]


@pytest.mark.parametrize("name", ["qpl", "uadk"])
def test_compressed_page_must_fill_exactly_one_page(name: str) -> None:
    # page 0 claims to be compressed but inflates to half a page, or to two pages
    for size in (PAGE // 2, 2 * PAGE):
        raw = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = raw.compress(bytes(size)) + raw.flush()
        if name == "uadk":
            body = b"\x78\x9c" + body + struct.pack(">I", zlib.adler32(bytes(size)))
        payload = struct.pack(">I", len(body)) + body
        with pytest.raises(PayloadError, match=f"{name}: page 0"):
            _decode(name, payload, 1)


def test_uadk_checks_header_and_adler() -> None:
    payload = bytearray(_payload("uadk", TEXT))
    bad = bytearray(payload)
    bad[-1] ^= 1
    with pytest.raises(PayloadError, match="adler32"):
        _decode("uadk", bytes(bad), 1)
    bad = bytearray(payload)
    bad[4] = 0x79  # CMF: method 9
    with pytest.raises(PayloadError, match="CMF"):
        _decode("uadk", bytes(bad), 1)
    bad = bytearray(payload)
    bad[5] ^= 0x01  # FCHECK broken
    with pytest.raises(PayloadError, match="FCHECK"):
        _decode("uadk", bytes(bad), 1)


def test_qemu_uadk_without_hardware_is_decoded() -> None:
    # QEMU without UADK hardware: every page raw
    data = sample_pages(5, "corpus", seed=4)
    payload = struct.pack(">5I", *[PAGE] * 5) + data
    assert _decode("uadk", payload, 5) == data


@pytest.mark.parametrize("name", ["qpl", "uadk"])
def test_every_page_fits_a_4k_window(name: str) -> None:
    # IAA (and, per QEMU, UADK) decompress only streams whose matches reach back <= 4 KiB: zlib with
    # windowBits 12 refuses anything further ("invalid distance too far back")
    data = sample_pages(64, "corpus", seed=21) + sample_pages(64, "mixed", seed=22)
    payload = _payload(name, data)
    lens = _table(payload, 128)
    pos = 4 * 128
    compressed = 0
    for i, ln in enumerate(lens):
        chunk = payload[pos : pos + ln]
        page = data[i * PAGE : (i + 1) * PAGE]
        if ln < PAGE:
            body = chunk[2:-4] if name == "uadk" else chunk
            assert zlib.decompress(body, -12) == page
            compressed += 1
        else:
            assert chunk == page
        pos += ln
    assert compressed > 64
