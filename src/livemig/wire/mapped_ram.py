"""QEMU's mapped-ram file format (QEMU 9.0+, ``migrate file:PATH`` with the ``mapped-ram`` capability).

Sans-IO: writers return bytes with the file offset they go to, the parser reads through a
``read_at(offset, size) -> bytes`` callable. The layout (docs/mapped-ram.md, "File layout")::

    0        "QEVM", version 3
             CONFIGURATION: machine type, subsection configuration/capabilities ["mapped-ram"]
             [FULL livemig/config]                               livemig snapshots only
             START ram: be64 total|MEM_SIZE, then per block:
                 u8 len, id, be64 used_length, MappedRamHeader (be32 version 1, be64 page size,
                 be64 bitmap offset, be64 pages offset)
                 bitmap (one bit per page, host-order unsigned longs) at the bitmap offset
                 pages at the pages offset (next 1 MiB boundary): page i at pages + i * page size
                 -> the stream goes on at pages offset + used_length
             EOS, footer
             [PART/END ram: EOS, footer]...  [SWITCHOVER_START]
             [FULL livemig/vcpu, FULL livemig/digest]            livemig snapshots only
             [QEMU's device sections]                            QEMU's files only
             EOF, [VMDESCRIPTION]

A page whose bit is clear was never written (zero pages are not stored: the file stays sparse).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from livemig.errors import LocalWireError, WireError
from livemig.wire import writers
from livemig.wire.constants import (
    LIVEMIG_SECTION_PREFIX,
    MIG_CMD_SWITCHOVER_START,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
)
from livemig.wire.layout import (
    BE32,
    BE64,
    COMMAND,
    FILE_HEADER,
    MAX_BLOB,
    MAX_MACHINE_TYPE,
    MAX_RAM_BLOCKS,
    MAX_VMDESC,
    SECTION_LONG,
    SECTION_SHORT,
    SECTION_TAIL,
    TYPE_LEN,
    U8,
    check_page_size,
)

CAPABILITY: Final = "mapped-ram"
#: MappedRamHeader: be32 version, be64 page_size, be64 bitmap_offset, be64 pages_offset (packed, 28 bytes)
HEADER = struct.Struct(">IQQQ")
HEADER_VERSION: Final = 1
#: where each block's pages start: the next multiple of this after its bitmap (QEMU's
#: MAPPED_RAM_FILE_OFFSET_ALIGNMENT; a reader only requires page alignment)
ALIGNMENT: Final = 1 << 20
CAPABILITIES_SUBSECTION: Final = "configuration/capabilities"
#: the other configuration subsections a reader can step over (name -> payload bytes)
_SUBSECTION_SIZES: Final = {"configuration/target-page-bits": 4, "configuration/uuid": 16}


def bitmap_size(npages: int) -> int:
    """Bytes of a block's bitmap: one bit per page, rounded up to whole 64-bit words."""
    return -(-npages // 64) * 8


@dataclass(frozen=True)
class BlockLayout:
    """Where one RAM block lives in the file (all offsets in bytes from the file's start)."""

    name: str
    length: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    @property
    def npages(self) -> int:
        return self.length // self.page_size

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.npages)

    @property
    def end(self) -> int:
        """Where the main stream continues after this block's pages area."""
        return self.pages_offset + self.length

    def header(self) -> bytes:
        return HEADER.pack(HEADER_VERSION, self.page_size, self.bitmap_offset, self.pages_offset)


def configuration(machine_type: str, capabilities: tuple[str, ...] = (CAPABILITY,)) -> bytes:
    """CONFIGURATION with the ``configuration/capabilities`` subsection: be32 count, then u8 length +
    name per capability (the destination refuses a file whose capabilities differ from its own)."""
    name = CAPABILITIES_SUBSECTION.encode()
    body = BE32.pack(len(capabilities)) + b"".join(U8.pack(len(c)) + c.encode("ascii") for c in capabilities)
    return writers.configuration(machine_type) + U8.pack(QEMU_VM_SUBSECTION) + U8.pack(len(name)) + name \
        + BE32.pack(1) + body


def ram_setup(offset: int, section_id: int, blocks: list[tuple[str, int]],
              page_size: int) -> tuple[list[tuple[int, bytes]], list[BlockLayout], int]:
    """The RAM setup section written at ``offset``: SECTION_START "ram", MEM_SIZE with a MappedRamHeader
    after each block, then (at the returned end offset, for the caller) EOS and the footer.

    Returns the pieces to write as (file offset, bytes), each block's layout, and the offset where
    the main stream continues. LocalWireError for what the format cannot carry (see writers).
    """
    check_page_size(page_size)
    mem = writers.ram_mem_size(blocks, page_size)  # checks names and lengths
    head = writers.section_start(section_id, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION) + mem[: BE64.size]
    pieces: list[tuple[int, bytes]] = []
    layouts: list[BlockLayout] = []
    at, pending = offset, head
    for name, length in blocks:
        raw = name.encode("ascii")
        entry = pending + U8.pack(len(raw)) + raw + BE64.pack(length)
        bitmap_at = at + len(entry) + HEADER.size
        pages_at = -(-(bitmap_at + bitmap_size(length // page_size)) // ALIGNMENT) * ALIGNMENT
        lay = BlockLayout(name, length, page_size, bitmap_at, pages_at)
        pieces.append((at, entry + lay.header()))
        layouts.append(lay)
        at, pending = lay.end, b""
    if pending:
        raise LocalWireError("mapped-ram: a RAM section needs at least one block")
    return pieces, layouts, at


# --- reading -------------------------------------------------------------------------------------
ReadAt = Callable[[int, int], bytes]


@dataclass
class FileInfo:
    """What :func:`parse` found in a mapped-ram file."""

    machine_type: str
    capabilities: list[str]
    blocks: list[BlockLayout]
    #: livemig sections (idstr -> blob), before and after RAM
    livemig: dict[str, bytes] = field(default_factory=dict)
    #: QEMU device sections (idstr of the first one, then the VMDESCRIPTION's device names)
    devices: list[str] = field(default_factory=list)
    #: the VMDESCRIPTION JSON text, if the file ends with one
    vmdesc: str | None = None


class _Cursor:
    """Sequential reads through ``read_at``; a read past the end is a WireError naming what was read."""

    def __init__(self, read_at: ReadAt, size: int, offset: int = 0) -> None:
        self.read_at, self.size, self.at = read_at, size, offset

    def take(self, n: int, what: str) -> bytes:
        data = self.read_at(self.at, n) if n else b""
        if len(data) != n:
            raise WireError(f"mapped-ram file: {what} at offset {self.at:#x}", "end of file",
                            f"{n} bytes (the file is {self.size} bytes: truncated?)")
        self.at += n
        return data

    def unpack(self, s: struct.Struct, what: str) -> tuple[int, ...]:
        return s.unpack(self.take(s.size, what))

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def text(self, n: int, what: str) -> str:
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise WireError(f"mapped-ram file: {what}", raw, "ASCII") from exc


def parse(read_at: ReadAt, size: int, page_size: int) -> FileInfo:
    """Parse a mapped-ram file of ``size`` bytes: everything but the pages and bitmaps themselves.

    Raises WireError naming the field, its offset and what was expected for a file that is not one
    (another format, no ``mapped-ram`` capability, a bad MappedRamHeader, a region outside the file,
    a record a mapped-ram file cannot hold, a truncated file).
    """
    cur = _Cursor(read_at, size)
    magic, version = cur.unpack(FILE_HEADER, "file header")
    if magic != QEMU_VM_FILE_MAGIC:
        raise WireError("mapped-ram file: magic", magic, QEMU_VM_FILE_MAGIC, hex=True,
                        note='not a QEMU migration file, which starts with "QEVM"')
    if version != QEMU_VM_FILE_VERSION:
        raise WireError("mapped-ram file: version", version, QEMU_VM_FILE_VERSION)
    machine, caps = _configuration(cur)
    if CAPABILITY not in caps:
        raise WireError("mapped-ram file: capabilities", caps, f"['{CAPABILITY}']",
                        note="a migration stream saved without mapped-ram: livemig reads only mapped-ram files")
    info = FileInfo(machine, caps, [])
    ram_id = _before_ram(cur, info)
    info.blocks = _mem_size(cur, page_size)
    _ram_records(cur, ram_id)
    _tail(cur, info, ram_id)
    return info


def _configuration(cur: _Cursor) -> tuple[str, list[str]]:
    kind = cur.byte("record type")
    if kind != QEMU_VM_CONFIGURATION:
        raise WireError("mapped-ram file: first record", kind, QEMU_VM_CONFIGURATION, hex=True, note="CONFIGURATION")
    (length,) = cur.unpack(BE32, "machine type length")
    if length > MAX_MACHINE_TYPE:
        raise WireError("mapped-ram file: machine type length", length, f"<= {MAX_MACHINE_TYPE}")
    machine = cur.text(length, "machine type")
    caps: list[str] = []
    while cur.at < cur.size and cur.read_at(cur.at, 1) == bytes([QEMU_VM_SUBSECTION]):
        cur.at += 1
        name = cur.text(cur.byte("subsection name length"), "subsection name")
        cur.unpack(BE32, f"subsection {name} version")
        if name == CAPABILITIES_SUBSECTION:
            (count,) = cur.unpack(BE32, "capability count")
            if count > 64:
                raise WireError("mapped-ram file: capability count", count, "<= 64")
            caps += [cur.text(cur.byte("capability length"), "capability") for _ in range(count)]
        elif name in _SUBSECTION_SIZES:
            cur.take(_SUBSECTION_SIZES[name], name)
        else:
            raise WireError("mapped-ram file: configuration subsection", name,
                            f"{CAPABILITIES_SUBSECTION} or {', '.join(_SUBSECTION_SIZES)}")
    return machine, caps


def _section_long(cur: _Cursor) -> tuple[int, int, str, int, int]:
    kind, section_id, idlen = cur.unpack(SECTION_LONG, "section header")
    idstr = cur.text(idlen, "section idstr")
    instance, version = cur.unpack(SECTION_TAIL, "section header")
    return kind, section_id, idstr, instance, version


def _footer(cur: _Cursor, section_id: int) -> None:
    kind, sid = cur.unpack(SECTION_SHORT, f"footer of section {section_id}")
    if kind != QEMU_VM_SECTION_FOOTER or sid != section_id:
        raise WireError(f"mapped-ram file: footer at offset {cur.at - SECTION_SHORT.size:#x}", (kind, sid),
                        (QEMU_VM_SECTION_FOOTER, section_id))


def _blob(cur: _Cursor, info: FileInfo, idstr: str, section_id: int) -> None:
    (length,) = cur.unpack(BE32, f"{idstr} length")
    if length > MAX_BLOB:
        raise WireError(f"mapped-ram file: {idstr} length", length, f"<= {MAX_BLOB}")
    info.livemig[idstr] = cur.take(length, idstr)
    _footer(cur, section_id)


def _is_livemig(idstr: str) -> bool:
    return idstr.startswith(LIVEMIG_SECTION_PREFIX) and len(idstr) > len(LIVEMIG_SECTION_PREFIX)


def _before_ram(cur: _Cursor, info: FileInfo) -> int:
    """livemig sections up to SECTION_START "ram"; returns the RAM section's id."""
    while True:
        at = cur.at
        kind, section_id, idstr, instance, version = _section_long(cur)
        if kind == QEMU_VM_SECTION_FULL and _is_livemig(idstr):
            _blob(cur, info, idstr, section_id)
            continue
        if kind != QEMU_VM_SECTION_START or idstr != RAM_SECTION_IDSTR:
            raise WireError(f"mapped-ram file: section at offset {at:#x}", (kind, idstr),
                            "SECTION_START 'ram' (0x01)", note="RAM must come first in a mapped-ram file")
        if (instance, version) != (0, RAM_SECTION_VERSION):
            raise WireError("mapped-ram file: 'ram' instance, version", (instance, version), (0, RAM_SECTION_VERSION))
        return section_id


def _mem_size(cur: _Cursor, page_size: int) -> list[BlockLayout]:
    (word,) = cur.unpack(BE64, "MEM_SIZE record")
    if word & (page_size - 1) != RAM_SAVE_FLAG_MEM_SIZE:
        raise WireError("mapped-ram file: first RAM record flags", word & (page_size - 1), RAM_SAVE_FLAG_MEM_SIZE,
                        hex=True, note="MEM_SIZE")
    left = word & ~(page_size - 1)
    blocks: list[BlockLayout] = []
    while left:
        name = cur.text(cur.byte("RAM block id length") or _zero_id(left), "RAM block id")
        (length,) = cur.unpack(BE64, f"length of RAM block {name!r}")
        if length > left or length % page_size or any(b.name == name for b in blocks):
            raise WireError(f"mapped-ram file: RAM block {name!r} length", length,
                            f"a multiple of {page_size}, <= {left} (the total left), each block once")
        if len(blocks) >= MAX_RAM_BLOCKS:
            raise WireError("mapped-ram file: RAM block count", len(blocks) + 1, f"<= {MAX_RAM_BLOCKS}")
        blocks.append(_block_header(cur, name, length, page_size))
        left -= length
        cur.at = blocks[-1].end
    return blocks


def _zero_id(left: int) -> int:
    raise WireError("mapped-ram file: RAM block id length", 0, "1..255", note=f"{left} bytes not declared yet")


def _block_header(cur: _Cursor, name: str, length: int, page_size: int) -> BlockLayout:
    at = cur.at
    version, psize, bitmap_at, pages_at = cur.unpack(HEADER, f"MappedRamHeader of block {name!r}")
    what = f"mapped-ram file: MappedRamHeader of block {name!r} at offset {at:#x}"
    if version != HEADER_VERSION:
        raise WireError(f"{what}: version", version, HEADER_VERSION, note="Mapped-ram header version not supported")
    if psize != page_size:
        raise WireError(f"{what}: page size", psize, page_size)
    lay = BlockLayout(name, length, page_size, bitmap_at, pages_at)
    if pages_at % page_size:
        raise WireError(f"{what}: pages offset", pages_at, f"a multiple of {page_size}", hex=True,
                        note="region has bad alignment")
    if not cur.at <= bitmap_at <= bitmap_at + lay.bitmap_size <= pages_at or lay.end > cur.size:
        raise WireError(f"{what}: bitmap, pages offsets", (hex(bitmap_at), hex(pages_at)),
                        f"header < bitmap ({lay.bitmap_size} bytes) <= pages, pages + {length:#x} <= "
                        f"file size {cur.size:#x}")
    return lay


def _ram_records(cur: _Cursor, ram_id: int) -> None:
    """The RAM records of a section until its EOS (a mapped-ram file has only EOS and, from an older
    writer, MULTIFD_FLUSH there), then the footer."""
    while True:
        (word,) = cur.unpack(BE64, "RAM record")
        if word == RAM_SAVE_FLAG_EOS:
            break
        if word != RAM_SAVE_FLAG_MULTIFD_FLUSH:
            raise WireError(f"mapped-ram file: RAM record at offset {cur.at - BE64.size:#x}", word,
                            "EOS 0x10", hex=True, note="pages of a mapped-ram file live at fixed offsets only")
    _footer(cur, ram_id)


def _tail(cur: _Cursor, info: FileInfo, ram_id: int) -> None:
    """After the RAM setup: RAM PART/END sections, livemig sections, QEMU's devices, EOF, VMDESCRIPTION."""
    while True:
        at = cur.at
        kind = cur.read_at(at, 1)[:1]
        if not kind:
            raise WireError(f"mapped-ram file: record at offset {at:#x}", "end of file", "EOF (0x00)",
                            note="the file is truncated")
        if kind[0] in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            _, sid = cur.unpack(SECTION_SHORT, "section header")
            if sid != ram_id:
                raise WireError(f"mapped-ram file: section id at offset {at:#x}", sid, ram_id, note="the 'ram' section")
            _ram_records(cur, ram_id)
        elif kind[0] == QEMU_VM_COMMAND:
            _, cmd, length = cur.unpack(COMMAND, "command")
            if (cmd, length) != (MIG_CMD_SWITCHOVER_START, 0):
                raise WireError(f"mapped-ram file: command at offset {at:#x}", (cmd, length),
                                (MIG_CMD_SWITCHOVER_START, 0), note="SWITCHOVER_START")
        elif kind[0] in (QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START):
            _, section_id, idstr, _, _ = _section_long(cur)
            if kind[0] == QEMU_VM_SECTION_FULL and _is_livemig(idstr):
                _blob(cur, info, idstr, section_id)
                continue
            # QEMU's device state: its layout is only in the VMDESCRIPTION at the end
            info.vmdesc = find_vmdesc(cur.read_at, cur.size, at)
            info.devices = device_names(info.vmdesc) if info.vmdesc else [idstr]
            return
        elif kind[0] == QEMU_VM_EOF:
            cur.at += 1
            if cur.at < cur.size:
                _vmdesc_record(cur, info)
            return
        else:
            raise WireError(f"mapped-ram file: record type at offset {at:#x}", kind[0],
                            "a section, SWITCHOVER_START or EOF", hex=True)


def _vmdesc_record(cur: _Cursor, info: FileInfo) -> None:
    kind, length = cur.unpack(TYPE_LEN, "VMDESCRIPTION")
    if kind != QEMU_VM_VMDESCRIPTION or length > MAX_VMDESC:
        raise WireError(f"mapped-ram file: record after EOF at offset {cur.at - TYPE_LEN.size:#x}",
                        (kind, length), f"VMDESCRIPTION (0x06) of at most {MAX_VMDESC} bytes")
    info.vmdesc = cur.take(length, "VMDESCRIPTION").decode("utf-8", "replace")
    if cur.at != cur.size:
        raise WireError("mapped-ram file: bytes after the VMDESCRIPTION", cur.size - cur.at, 0)


def find_vmdesc(read_at: ReadAt, size: int, start: int) -> str | None:
    """The VMDESCRIPTION JSON that ends the file (EOF 0x00, 0x06, be32 length, JSON to the end), found
    from the back as ``scripts/analyze-migration.py`` does; None when there is none."""
    tail = read_at(start, min(size - start, MAX_VMDESC + 64))
    base = size - len(tail)
    at = len(tail)
    while (at := tail.rfind(bytes([QEMU_VM_VMDESCRIPTION]), 0, at)) > 0:
        (length,) = BE32.unpack_from(tail, at + 1) if at + 5 <= len(tail) else (-1,)
        if base + at + 5 + length == size and tail[at - 1] == QEMU_VM_EOF:
            return tail[at + 5 :].decode("utf-8", "replace")
    return None


def device_names(vmdesc: str) -> list[str]:
    """The device names a VMDESCRIPTION lists (``devices[].name``, with ``instance_id`` when not 0)."""
    try:
        devices = json.loads(vmdesc).get("devices", [])
        return [d["name"] + (f"/{d['instance_id']}" if d.get("instance_id") else "") for d in devices]
    except (ValueError, AttributeError, KeyError, TypeError):
        return []


__all__ = ["ALIGNMENT", "CAPABILITY", "HEADER", "BlockLayout", "FileInfo", "bitmap_size",
           "configuration", "device_names", "find_vmdesc", "parse", "ram_setup"]
