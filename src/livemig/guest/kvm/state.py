"""The KVM guest's vCPU state blob: encoding and validation, pure (no KVM needed).

Format (little-endian)::

    header   8s magic "LMKVMST\\0", u16 version 1, u16 flags 0, u32 vCPU count,
             u32 body length, u32 CRC-32 (zlib) of the body
    body     per vCPU, the records of :data:`RECORDS` in that order, each
             u32 tag, u32 length, then ``length`` bytes

The record order is the load order (docs/kvm.md, "vCPU state"): special registers first (they
set the mode the others are interpreted in), then XCR0 before the XSAVE area it enables, the
general registers, the multiprocessing and event state, and last the host-side report port.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence

from ...errors import GuestError

MAGIC = b"LMKVMST\x00"
VERSION = 1
#: magic, version, flags, vCPU count, body length, CRC-32 of the body
HEADER = struct.Struct("<8sHHIII")
#: tag, length
RECORD = struct.Struct("<II")

#: (tag, name, size in bytes) in load order; sizes are those of the x86 kvm structs
RECORDS: tuple[tuple[int, str, int], ...] = (
    (2, "sregs", 312),
    (5, "xcrs", 392),
    (4, "xsave", 4096),
    (3, "fpu", 416),
    (1, "regs", 144),
    (6, "mp_state", 4),
    (7, "vcpu_events", 64),
    (8, "ports", 16),
)
NAMES = tuple(name for _tag, name, _size in RECORDS)


def encode_state(vcpus: Sequence[Mapping[str, bytes]]) -> bytes:
    """One blob from per-vCPU records (``{name: bytes}`` with every name of :data:`RECORDS`).

    ValueError if a record is missing or has the wrong size (a bug in the caller, not bad input).
    """
    body = bytearray()
    for i, recs in enumerate(vcpus):
        for tag, name, size in RECORDS:
            data = recs.get(name)
            if data is None or len(data) != size:
                got = "missing" if data is None else f"{len(data)} bytes"
                raise ValueError(f"vCPU {i} record {name}: {got}, expected {size} bytes")
            body += RECORD.pack(tag, size) + data
    return HEADER.pack(MAGIC, VERSION, 0, len(vcpus), len(body), zlib.crc32(body)) + bytes(body)


def decode_state(blob: bytes, nvcpus: int) -> list[dict[str, bytes]]:
    """Validate a blob of :func:`encode_state` for a guest of ``nvcpus`` vCPUs; per vCPU ``{name: bytes}``.

    GuestError naming the first thing wrong: length, magic, version, flags, vCPU count, body
    length, CRC-32, a record's tag, size or truncation, trailing bytes.
    """
    h = HEADER.size
    if len(blob) < h:
        raise GuestError(f"KVM state blob: {len(blob)} bytes, shorter than its {h}-byte header")
    magic, version, flags, count, length, crc = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise GuestError(f"KVM state blob: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise GuestError(f"KVM state blob: version {version}, expected {VERSION}")
    if flags != 0:
        raise GuestError(f"KVM state blob: flags {flags:#x}, expected 0")
    if count != nvcpus:
        raise GuestError(f"KVM state blob: {count} vCPUs, this guest has smp {nvcpus}")
    if len(blob) - h != length:
        raise GuestError(f"KVM state blob: body of {len(blob) - h} bytes, header says {length}")
    body = memoryview(blob)[h:]
    if zlib.crc32(body) != crc:
        raise GuestError(f"KVM state blob: CRC-32 {zlib.crc32(body):#010x}, header says {crc:#010x}")
    out: list[dict[str, bytes]] = []
    pos = 0
    for i in range(count):
        recs: dict[str, bytes] = {}
        for tag, name, size in RECORDS:
            if pos + RECORD.size > len(body):
                raise GuestError(f"KVM state blob: vCPU {i} record {name} truncated")
            got_tag, got_len = RECORD.unpack_from(body, pos)
            if got_tag != tag or got_len != size:
                raise GuestError(f"KVM state blob: vCPU {i} record (tag {got_tag}, {got_len} bytes), "
                                 f"expected {name} (tag {tag}, {size} bytes)")
            pos += RECORD.size
            if pos + size > len(body):
                raise GuestError(f"KVM state blob: vCPU {i} record {name} truncated")
            recs[name] = bytes(body[pos: pos + size])
            pos += size
        out.append(recs)
    if pos != len(body):
        raise GuestError(f"KVM state blob: {len(body) - pos} trailing bytes")
    return out
