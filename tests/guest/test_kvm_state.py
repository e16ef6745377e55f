"""The KVM guest's vCPU state blob, encoded and validated without KVM."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from livemig.errors import GuestError
from livemig.guest.kvm import state as kst


def records(nvcpus: int, seed: int = 0) -> list[dict[str, bytes]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.bytes(size) for _tag, name, size in kst.RECORDS} for _ in range(nvcpus)]


def recrc(blob: bytes, body: bytes) -> bytes:
    """``blob``'s header over a replaced ``body``, with the length and CRC-32 made to match."""
    magic, version, flags, nvcpus, _length, _crc = kst.HEADER.unpack_from(blob)
    return kst.HEADER.pack(magic, version, flags, nvcpus, len(body), zlib.crc32(body)) + body


@pytest.mark.parametrize("nvcpus", [1, 3])
def test_round_trip(nvcpus: int) -> None:
    recs = records(nvcpus)
    blob = kst.encode_state(recs)
    per_vcpu = sum(kst.RECORD.size + size for _t, _n, size in kst.RECORDS)
    assert len(blob) == kst.HEADER.size + nvcpus * per_vcpu
    assert blob[:8] == b"LMKVMST\x00"
    assert kst.decode_state(blob, nvcpus) == recs


def test_records_are_in_load_order() -> None:
    # special registers first, XCR0 before the XSAVE area it enables, the report port last
    assert kst.NAMES == ("sregs", "xcrs", "xsave", "fpu", "regs", "mp_state", "vcpu_events", "ports")


def test_malformed_blobs_are_refused_naming_the_fault() -> None:
    blob = kst.encode_state(records(1))
    h = kst.HEADER.size
    body = blob[h:]
    first_len = kst.RECORD.size + kst.RECORDS[0][2]
    cases = {
        "shorter than its 24-byte header": blob[:10],
        "magic b'XMKVMST": b"X" + blob[1:],
        "version 9, expected 1": blob[:8] + (9).to_bytes(2, "little") + blob[10:],
        "flags 0x4, expected 0": blob[:10] + (4).to_bytes(2, "little") + blob[12:],
        "2 vCPUs, this guest has smp 1": blob[:12] + (2).to_bytes(4, "little") + blob[16:],
        "header says": blob[:-1],
        "CRC-32": blob[:h] + bytes([blob[h] ^ 1]) + blob[h + 1:],
        "expected sregs \\(tag 2, 312 bytes\\)": recrc(blob, (9).to_bytes(4, "little") + body[4:]),
        "record xcrs truncated": recrc(blob, body[: first_len + 4]),
        "record vcpu_events truncated": recrc(blob, body[:-30]),
        "3 trailing bytes": recrc(blob, body + b"abc"),
    }
    for match, bad in cases.items():
        with pytest.raises(GuestError, match=match):
            kst.decode_state(bad, 1)


def test_encode_refuses_a_missing_or_mis_sized_record() -> None:
    recs = records(2)
    del recs[1]["fpu"]
    with pytest.raises(ValueError, match="vCPU 1 record fpu: missing"):
        kst.encode_state(recs)
    recs = records(1)
    recs[0]["regs"] = b"short"
    with pytest.raises(ValueError, match="vCPU 0 record regs: 5 bytes, expected 144"):
        kst.encode_state(recs)
