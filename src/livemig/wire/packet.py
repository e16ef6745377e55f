"""MultiFDPacket_t: the fixed-size RAM packet header of a multifd channel (10.x layout).

docs/wire.md, "Multifd packet" explains the fields, the flags and the receiver's checks.

Layout (QEMU 10.2 ``migration/multifd.h``, packed, all integers big-endian)::

    off  size            field
      0     4            magic             0x11223344
      4     4            version           1
      8     4            flags             SYNC 0x01 | one compression flag (mask 0x3e); 0x40 device state
     12     4            pages_alloc       page_count (128 for 4 KiB pages); 0 in a 10.2 SYNC-only packet
     16     4            normal_pages      pages whose data follows the header
     20     4            next_packet_size  payload bytes that follow the header on this channel
     24     8            packet_num        global sequence number (informational)
     32     4            zero_pages        (9.0+) zero pages listed after the normal ones
     36    28            unused            zero
     64   256            ramblock          RAMBlock id, NUL-terminated (the receiver forces byte 255 to 0)
    320   8*page_count   offset[]          u64 byte offsets within the block: normal, then zero, then padding

The header is always :func:`packet_len` bytes (1344 for 4 KiB pages) whatever the page count.

Sans-IO: :func:`encode_packet` / :func:`encode_sync` return the header bytes to write (the payload
is the compression method's business), :func:`decode_packet` validates the fields QEMU validates
when unfilling a packet, and :func:`check_packet` does the checks that need the receiver's
state (the method's flag, the block's length). Offsets are converted with numpy in one call each
way, never with a Python loop per page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from livemig._types import Buffer
from livemig.errors import LocalWireError, WireError
from livemig.ram.pages import runs
from livemig.wire.constants import (
    COMPRESSION_MASK,
    FLAG_DEVICE_STATE,
    FLAG_SYNC,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_SIZE,
    MULTIFD_VERSION,
    PAGE_SIZE,
)

Offsets = npt.NDArray[np.uint64]
Pages = npt.NDArray[np.int64]

#: magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages,
#: 28 reserved bytes, ramblock[256]
_HEADER = struct.Struct(">6IQI28x256s")
#: bytes before offset[]
HEADER_FIXED_SIZE = 320
assert _HEADER.size == HEADER_FIXED_SIZE
_RAMBLOCK_SIZE = 256
_RAMBLOCK_OFFSET = 64
#: an offset on the wire: big-endian u64
_WIRE_U64 = np.dtype(">u8")
#: flag bits a RAM packet may carry
_KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_FLAGS_EXPECTED = f"only SYNC and compression bits ({_KNOWN_FLAGS:#x})"
#: page size -> page_count (valid page sizes only; a process sees one or two)
_slots: dict[int, int] = {}


def check_magic_version(magic: int, version: int) -> None:
    """The first two fields of MultiFDInit_t and of every packet: WireError naming what came."""
    if magic != MULTIFD_MAGIC:
        raise WireError("multifd: packet magic", magic, MULTIFD_MAGIC, hex=True)
    if version != MULTIFD_VERSION:
        raise WireError("multifd: packet version", version, MULTIFD_VERSION)


def page_count(page_size: int = PAGE_SIZE) -> int:
    """Offset slots per packet: MULTIFD_PACKET_SIZE / page_size (128 for 4 KiB pages).

    Raises LocalWireError when ``page_size`` does not divide MULTIFD_PACKET_SIZE (QEMU requires it).
    """
    slots = _slots.get(page_size)
    if slots is None:
        if page_size <= 0 or MULTIFD_PACKET_SIZE % page_size:
            raise LocalWireError(f"page size {page_size} does not divide the multifd packet size {MULTIFD_PACKET_SIZE}")
        slots = _slots[page_size] = MULTIFD_PACKET_SIZE // page_size
    return slots


def packet_len(page_size: int = PAGE_SIZE) -> int:
    """Bytes of one packet header on the wire: 320 + 8 * page_count (1344 for 4 KiB pages)."""
    return HEADER_FIXED_SIZE + 8 * page_count(page_size)


@dataclass(slots=True)
class PacketHeader:
    """A decoded, format-checked packet header.

    ``offsets`` holds ``normal_pages + zero_pages`` native uint64 byte offsets within ``ramblock``:
    the normal pages first (in payload order), then the zero pages. It is a copy, independent of
    the buffer it was decoded from. ``ramblock`` is "" when the packet lists no pages.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    ramblock: str
    offsets: Offsets

    @property
    def normal_offsets(self) -> Offsets:
        """Offsets of the pages whose data is in the payload, in payload order (a view)."""
        return self.offsets[: self.normal_pages]

    @property
    def zero_offsets(self) -> Offsets:
        """Offsets of the pages the receiver must make zero (a view)."""
        return self.offsets[self.normal_pages : self.normal_pages + self.zero_pages]

    @property
    def is_sync(self) -> bool:
        """True when the sender flagged MULTIFD_FLAG_SYNC: post to the main stream's barrier after it."""
        return bool(self.flags & FLAG_SYNC)

    @property
    def has_data(self) -> bool:
        """True when the packet lists pages (10.2: normal_pages + zero_pages > 0)."""
        return self.normal_pages + self.zero_pages > 0

    @property
    def compression_flag(self) -> int:
        """The compression bits of ``flags`` (0 for none)."""
        return self.flags & COMPRESSION_MASK


class PacketPages(NamedTuple):
    """A checked packet's pages as page indices (offset / page size, ``int64``), from
    :func:`check_packet`."""

    #: pages whose data is in the payload, in payload order
    normal: Pages
    #: pages the receiver must make zero
    zero: Pages
    #: ``normal`` as runs of consecutive ascending pages, (first page, count), in payload order
    normal_runs: list[tuple[int, int]]
    #: (lowest, highest) page of ``normal`` and ``zero``; None when the packet lists none
    span: tuple[int, int] | None


_NO_PAGES: Pages = np.empty(0, dtype=np.int64)
_NO_PAGES.flags.writeable = False
#: raw ramblock field -> decoded name: a channel sees the same few names packet after packet
_names: dict[bytes, str] = {}
#: ramblock name -> its checked field bytes (the sender's side of the same)
_fields: dict[str, bytes] = {}


def _ramblock_field(ramblock: str) -> bytes:
    try:
        raw = ramblock.encode("ascii")
    except UnicodeEncodeError as exc:
        raise LocalWireError(f"multifd packet: ramblock {ramblock!r} is not ASCII") from exc
    if len(raw) >= _RAMBLOCK_SIZE:
        raise LocalWireError(f"multifd packet: ramblock {ramblock!r} is {len(raw)} bytes, max {_RAMBLOCK_SIZE - 1}")
    if b"\0" in raw:
        raise LocalWireError(f"multifd packet: ramblock {ramblock!r} contains a NUL byte")
    if raw and len(_fields) < 64:
        _fields[ramblock] = raw
    return raw


def _as_offsets(name: str, values: npt.ArrayLike) -> npt.NDArray[np.integer]:
    if isinstance(values, np.ndarray) and values.dtype == np.uint64 and values.ndim == 1:
        return values  # what the sender passes: nothing to check
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise LocalWireError(f"multifd packet: {name} offsets must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise LocalWireError(f"multifd packet: {name} offsets must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise LocalWireError(f"multifd packet: {name} offsets contain a negative value {int(arr.min())}")
    return arr


def encode_packet(
    *,
    flags: int,
    packet_num: int,
    ramblock: str,
    normal: npt.ArrayLike,
    zero: npt.ArrayLike,
    next_packet_size: int,
    page_size: int = PAGE_SIZE,
) -> bytes:
    """The header of a RAM packet, :func:`packet_len` bytes, as QEMU 10.2 fills it.

    ``normal`` and ``zero`` are byte offsets within ``ramblock`` (non-negative integers, one
    dimension); ``len(normal) + len(zero)`` must not exceed :func:`page_count`. pages_alloc is
    page_count, unused offset slots and reserved fields are zero. ``flags`` may only carry SYNC and
    compression bits. Raises LocalWireError for anything that QEMU's receiver would refuse or that does
    not fit its field (a ramblock name of 256 bytes or more, or not ASCII). Offsets are not checked
    against a block here: the sender owns its blocks.
    """
    slots = page_count(page_size)
    if flags & ~_KNOWN_FLAGS or not 0 <= flags <= _U32_MAX:
        raise LocalWireError(f"multifd packet: flags {flags:#x} outside SYNC|compression ({_KNOWN_FLAGS:#x})")
    if not 0 <= packet_num <= _U64_MAX:
        raise LocalWireError(f"multifd packet: packet_num {packet_num} does not fit a u64")
    if not 0 <= next_packet_size <= _U32_MAX:
        raise LocalWireError(f"multifd packet: next_packet_size {next_packet_size} does not fit a u32")
    name = _fields.get(ramblock) or _ramblock_field(ramblock)
    normal_arr = _as_offsets("normal", normal)
    zero_arr = _as_offsets("zero", zero)
    used = normal_arr.size + zero_arr.size
    if used > slots:
        raise LocalWireError(f"multifd packet: {normal_arr.size} normal + {zero_arr.size} zero pages exceed {slots}")
    fixed = _HEADER.pack(
        MULTIFD_MAGIC, MULTIFD_VERSION, flags, slots, normal_arr.size, next_packet_size, packet_num, zero_arr.size, name
    )
    # one vectorized big-endian conversion per offset list, joined with the zero padding slots
    parts = [fixed, normal_arr.astype(">u8").tobytes()]
    if zero_arr.size:
        parts.append(zero_arr.astype(">u8").tobytes())
    if used < slots:
        parts.append(bytes(8 * (slots - used)))
    return b"".join(parts)


def encode_sync(packet_num: int, page_size: int = PAGE_SIZE) -> bytes:
    """A 10.2 SYNC-only packet: flags = SYNC, packet_num, everything else zero (pages_alloc too)."""
    if not 0 <= packet_num <= _U64_MAX:
        raise LocalWireError(f"multifd packet: packet_num {packet_num} does not fit a u64")
    buf = bytearray(packet_len(page_size))
    _HEADER.pack_into(buf, 0, MULTIFD_MAGIC, MULTIFD_VERSION, FLAG_SYNC, 0, 0, 0, packet_num, 0, b"")
    return bytes(buf)


def decode_packet(buf: Buffer, page_size: int = PAGE_SIZE) -> PacketHeader:
    """Decode and format-check one packet header of exactly :func:`packet_len` bytes.

    Checks, each raising :class:`~livemig.errors.WireError` with the value received and expected:
    length, magic, version, flags (only SYNC and compression bits; the device-state flag 0x40 is
    "not supported"), pages_alloc <= page_count, normal_pages <= pages_alloc, zero_pages <=
    pages_alloc - normal_pages, and a ramblock name that is ASCII (byte 255 is forced to NUL, as
    QEMU does; the name ends at the first NUL). Padding slots and reserved fields are ignored. For
    a packet with no pages the ramblock is ignored and returned as "". Checks needing the
    receiver's method and block lengths are in :func:`check_packet`.
    """
    slots = page_count(page_size)
    view = memoryview(buf).cast("B")
    expected_len = HEADER_FIXED_SIZE + 8 * slots
    if view.nbytes != expected_len:
        raise WireError("multifd: packet length", view.nbytes, expected_len)
    (magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages, raw_name) = (
        _HEADER.unpack_from(view)
    )
    if magic != MULTIFD_MAGIC or version != MULTIFD_VERSION:
        check_magic_version(magic, version)
    if flags & FLAG_DEVICE_STATE:
        raise WireError("multifd: packet flags", flags, _FLAGS_EXPECTED, hex=True, note="DEVICE_STATE is not supported")
    if flags & ~_KNOWN_FLAGS:
        raise WireError("multifd: packet flags", flags, _FLAGS_EXPECTED, hex=True, note="unknown bits")
    if pages_alloc > slots:
        raise WireError("multifd: packet pages_alloc", pages_alloc, f"<= {slots}")
    if normal_pages > pages_alloc:
        raise WireError("multifd: packet normal_pages", normal_pages, f"<= pages_alloc {pages_alloc}")
    if zero_pages > pages_alloc - normal_pages:
        free = pages_alloc - normal_pages
        raise WireError("multifd: packet zero_pages", zero_pages, f"<= pages_alloc - normal_pages {free}")
    used = normal_pages + zero_pages
    ramblock = ""
    if used:
        ramblock = _names.get(raw_name) or _ramblock_name(raw_name)
        # the ndarray constructor over the buffer costs a third of np.frombuffer's; astype copies
        offsets: Offsets = np.ndarray((used,), _WIRE_U64, view, HEADER_FIXED_SIZE).astype(np.uint64)
    else:
        offsets = np.empty(0, dtype=np.uint64)
    # positional: the field order of PacketHeader
    return PacketHeader(flags, pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages, ramblock, offsets)


def _ramblock_name(raw_name: bytes) -> str:
    """The ramblock field's name: up to the first NUL, byte 255 forced to NUL, ASCII (WireError)."""
    name = raw_name[: _RAMBLOCK_SIZE - 1].split(b"\0", 1)[0]
    try:
        ramblock = name.decode("ascii")
    except UnicodeDecodeError as exc:
        raise WireError("multifd: packet ramblock", name, "ASCII") from exc
    if len(_names) < 64:
        _names[raw_name] = ramblock
    return ramblock


def check_packet(hdr: PacketHeader, *, method_flag: int, block_size: int, page_size: int = PAGE_SIZE) -> PacketPages:
    """Checks that need the receiver's state; the guard that keeps writes inside guest RAM.

    For a packet with pages (``hdr.has_data``): ``flags & COMPRESSION_MASK`` must equal
    ``method_flag``; every offset must be ``<= block_size - page_size`` (QEMU's bound), a multiple
    of ``page_size`` (stricter than QEMU, which does not check alignment), and appear only once in
    the packet. Packets without pages pass (QEMU only counts them). Raises
    :class:`~livemig.errors.WireError`. Returns the pages as :class:`PacketPages` (empty for a
    packet without pages). Cost: for the usual packet of consecutive ascending pages, scalar tests
    and one arange compared as bytes; for one whose pages are consecutive once sorted (zero pages
    listed last), a sort more; for any other, a few passes and a sort.
    """
    if not hdr.has_data:
        return PacketPages(_NO_PAGES, _NO_PAGES, [], None)
    received = hdr.flags & COMPRESSION_MASK
    if received != method_flag:
        raise WireError("multifd: packet compression flags", received, method_flag, hex=True)
    offsets = hdr.offsets
    n, nn = offsets.size, hdr.normal_pages
    first, last = int(offsets[0]), int(offsets[-1])
    if _consecutive(offsets, first, last, block_size, page_size):
        # the usual packet: consecutive ascending pages, so each listed once, aligned and inside the
        # block
        start = first // page_size
        pages: Pages = np.arange(start, start + n, dtype=np.int64)
        return PacketPages(pages[:nn], pages[nn:], [(start, nn)] if nn else [], (start, start + n - 1))
    # any other packet (zero pages moved to the end leave gaps in the normal ones): one sort gives
    # the span, and the sorted offsets are usually one consecutive run (the packet's pages, zero
    # ones listed last); else the plain tests give the uniqueness; the detailed checks run only to
    # name what is wrong
    ordered = np.sort(offsets)
    lo, hi = int(ordered[0]), int(ordered[-1])
    if not _consecutive(ordered, lo, hi, block_size, page_size) and (
            hi > block_size - page_size or bool((offsets % page_size).any())
            or (n > 1 and not bool((ordered[1:] != ordered[:-1]).all()))):
        _check_offsets(hdr, block_size, page_size)
    pages = (offsets // page_size).view(np.int64)  # offsets checked: < 2**63
    return PacketPages(pages[:nn], pages[nn:], runs(pages[:nn]), (lo // page_size, hi // page_size))


def _consecutive(offsets: Offsets, first: int, last: int, block_size: int, page_size: int) -> bool:
    """True when ``offsets`` are ``first, first + page_size, ..., last``, ``first`` aligned and
    ``last`` inside the block: each listed once, aligned and inside it. Scalar tests, then one
    arange compared as bytes."""
    n = offsets.size
    return (
        last - first == (n - 1) * page_size
        and first % page_size == 0
        and last <= block_size - page_size
        and (n == 1 or np.arange(first, last + page_size, page_size, dtype=np.uint64).tobytes() == offsets.tobytes())
    )


def _check_offsets(hdr: PacketHeader, block_size: int, page_size: int) -> None:
    """check_packet's offset checks for any packet: inside the block, aligned, each once."""
    offsets = hdr.offsets
    limit = block_size - page_size
    where = f"multifd: offset in block {hdr.ramblock!r} of {block_size} bytes"
    too_long = np.flatnonzero(offsets > np.uint64(limit)) if limit >= 0 else np.arange(offsets.size)
    if too_long.size:
        raise WireError(where, int(offsets[too_long[0]]), f"<= {limit}", note="offset too long")
    unaligned = np.flatnonzero(offsets % np.uint64(page_size))
    if unaligned.size:
        raise WireError(where, int(offsets[unaligned[0]]), f"a multiple of {page_size}", note="not page aligned")
    if offsets.size > 1:
        ordered = np.sort(offsets)
        dups = np.flatnonzero(ordered[1:] == ordered[:-1])
        if dups.size:
            what = f"multifd: offsets of packet {hdr.packet_num}"
            raise WireError(what, int(ordered[dups[0]]), "each offset once", note="listed more than once")
