"""The main migration stream (reference §4): record writers and a sans-IO reader.

What livemig puts on the main channel, in QEMU's byte format (``migration/savevm.c``, ``ram.c``)::

    file_header()                       "QEVM", version 3                      (§4.1)
    configuration(machine_type)         0x07, be32 len, name; no subsections   (§4.3)
    [command(...)]                      0x08, be16 cmd, be16 len, data         (§4.2)
    section_start(id, "ram", 0, 4)      0x01 ... then RAM records:             (§4.5)
        ram_mem_size(blocks)            be64 total|0x04, {u8 len, id, be64 used_length}*
        ram_multifd_flush()             be64 0x200   (per-round "modern" multifd sync marker)
        ram_eos()                       be64 0x10
    section_footer(id)                  0x7e, be32 id (section footers are always on)
    section_start/full(id, "livemig/...", 0, v), blob(data), section_footer(id)
    section_part(id) / section_end(id)  0x02 / 0x03, be32 id, payload, footer
    [command SWITCHOVER_START]          before the final SECTION_ENDs (10.0+)
    eof()                               0x00
    [vm_description(json)]              0x06, be32 len, JSON

The payload of a section is RAM records for the section whose idstr is "ram" (version 4,
instance 0), and exactly one :func:`blob` (be32 length + bytes) for livemig's own sections, whose
idstr starts with "livemig/". Any other section is refused: without a vmstate description its
payload cannot even be skipped.

Writers are pure functions returning ``bytes``. :class:`StreamReader` is h11-shaped: ``feed()``
bytes as they arrive (``feed(b"")`` = the peer closed), then call ``next_event()`` until it returns
:data:`NEED_DATA`. Events are frozen dataclasses. Bad input raises
:class:`~livemig.errors.WireError` naming the field, the value received and the value expected;
after that the reader refuses further use.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from livemig.errors import WireError
from livemig.wire.constants import (
    LIVEMIG_SECTION_PREFIX,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PING,
    MIG_CMD_SWITCHOVER_START,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_FULL,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
)

Buffer = bytes | bytearray | memoryview

_U8 = struct.Struct(">B")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
#: magic, version (§4.1)
_FILE_HEADER = struct.Struct(">II")
#: type, section_id (PART, END, FOOTER)
_SECTION_SHORT = struct.Struct(">BI")
#: type, section_id, idlen (START, FULL; idstr, instance_id and version_id follow)
_SECTION_LONG = struct.Struct(">BIB")
#: instance_id, version_id
_SECTION_TAIL = struct.Struct(">II")
#: type, cmd, len (COMMAND)
_COMMAND = struct.Struct(">BHH")
#: type, len (CONFIGURATION, VMDESCRIPTION)
_TYPE_LEN = struct.Struct(">BI")

#: default largest livemig blob the reader accepts
MAX_BLOB: Final = 64 * 1024 * 1024
#: largest VMDESCRIPTION JSON the reader accepts
MAX_VMDESC: Final = 64 * 1024 * 1024
#: largest machine type name the reader accepts (QEMU's are ~20 bytes)
MAX_MACHINE_TYPE: Final = 256
#: most RAM blocks one MEM_SIZE record may declare
MAX_RAM_BLOCKS: Final = 4096

#: exact payload length of each command the reader accepts (savevm.c's command table)
_COMMAND_LENGTHS: Final = {MIG_CMD_OPEN_RETURN_PATH: 0, MIG_CMD_PING: 4, MIG_CMD_SWITCHOVER_START: 0}
_COMMAND_NAMES: Final = {
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}

#: RAM record types (flags minus CONTINUE must be exactly one of these)
_RAM_TYPES: Final = (
    RAM_SAVE_FLAG_ZERO,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
)
_RAM_REFUSED: Final = {
    RAM_SAVE_FLAG_FULL: "FULL (0x01, obsolete since 2009)",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE (0x40)",
    RAM_SAVE_FLAG_HOOK: "HOOK (0x80, RDMA only)",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE (0x100, legacy compress)",
}


def _ascii(what: str, text: str, max_len: int) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {text!r} is not ASCII") from exc
    if len(raw) > max_len:
        raise ValueError(f"{what} {text!r} is {len(raw)} bytes, max {max_len}")
    return raw


def _check_page_size(page_size: int) -> None:
    # RAM flags live below the page size and go up to 0x200, so pages must be >= 1 KiB (ram.h).
    if page_size < 1024 or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} must be a power of two >= 1024")


# ---------------------------------------------------------------------------------------------
# Writers


def file_header() -> bytes:
    """QEMU_VM_FILE_MAGIC "QEVM" and QEMU_VM_FILE_VERSION 3 (8 bytes)."""
    return _FILE_HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def configuration(machine_type: str) -> bytes:
    """The CONFIGURATION record: 0x07, be32 length, the machine type name (ASCII, no NUL), no subsections."""
    name = _ascii("machine type", machine_type, MAX_MACHINE_TYPE)
    return _TYPE_LEN.pack(QEMU_VM_CONFIGURATION, len(name)) + name


def _section_long(kind: int, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    name = _ascii("section idstr", idstr, 255)
    if not name:
        raise ValueError("section idstr must not be empty")
    return (
        _SECTION_LONG.pack(kind, section_id, len(name)) + name + _SECTION_TAIL.pack(instance_id, version_id)
    )


def section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """SECTION_START header: 0x01, be32 id, u8 len, idstr, be32 instance, be32 version.

    The section's payload and :func:`section_footer` follow.
    """
    return _section_long(QEMU_VM_SECTION_START, section_id, idstr, instance_id, version_id)


def section_full(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """SECTION_FULL header, the same layout as :func:`section_start` with type 0x04."""
    return _section_long(QEMU_VM_SECTION_FULL, section_id, idstr, instance_id, version_id)


def section_part(section_id: int) -> bytes:
    """SECTION_PART header: 0x02, be32 section id."""
    return _SECTION_SHORT.pack(QEMU_VM_SECTION_PART, section_id)


def section_end(section_id: int) -> bytes:
    """SECTION_END header: 0x03, be32 section id."""
    return _SECTION_SHORT.pack(QEMU_VM_SECTION_END, section_id)


def section_footer(section_id: int) -> bytes:
    """SECTION_FOOTER: 0x7e, be32 section id (after every START/PART/END/FULL payload)."""
    return _SECTION_SHORT.pack(QEMU_VM_SECTION_FOOTER, section_id)


def eof() -> bytes:
    """QEMU_VM_EOF: the end of the device stream."""
    return bytes([QEMU_VM_EOF])


def vm_description(json_text: str) -> bytes:
    """VMDESCRIPTION (0x06, be32 length, JSON text), written after :func:`eof`."""
    raw = json_text.encode("utf-8")
    if len(raw) > MAX_VMDESC:
        raise ValueError(f"VMDESCRIPTION of {len(raw)} bytes exceeds {MAX_VMDESC}")
    return _TYPE_LEN.pack(QEMU_VM_VMDESCRIPTION, len(raw)) + raw


def command(cmd: int, data: bytes = b"") -> bytes:
    """A COMMAND record: 0x08, be16 cmd, be16 len, data (no check of cmd: see the named helpers)."""
    if len(data) > 0xFFFF:
        raise ValueError(f"command data of {len(data)} bytes exceeds 65535")
    return _COMMAND.pack(QEMU_VM_COMMAND, cmd, len(data)) + bytes(data)


def switchover_start() -> bytes:
    """COMMAND SWITCHOVER_START (11, no data): the source paused the guest, the final sections follow."""
    return command(MIG_CMD_SWITCHOVER_START)


def open_return_path() -> bytes:
    """COMMAND OPEN_RETURN_PATH (1, no data)."""
    return command(MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    """COMMAND PING (2, be32 value)."""
    return command(MIG_CMD_PING, _BE32.pack(value))


def ram_mem_size(blocks: list[tuple[str, int]], page_size: int = 4096) -> bytes:
    """RAM_SAVE_FLAG_MEM_SIZE: be64 (total | 0x04), then per block u8 len, id, be64 used_length.

    Each length must be a multiple of ``page_size`` (so the total does not spill into the flag
    bits); ids are 1..255 ASCII bytes and unique. Raises ValueError otherwise.
    """
    _check_page_size(page_size)
    parts = []
    seen: set[str] = set()
    total = 0
    for name, length in blocks:
        raw = _ascii("RAM block id", name, 255)
        if not raw or name in seen:
            raise ValueError(f"RAM block id {name!r} is empty or repeated")
        if length < 0 or length % page_size:
            raise ValueError(
                f"RAM block {name!r} length {length} is not a multiple of the page size {page_size}"
            )
        seen.add(name)
        total += length
        parts.append(_U8.pack(len(raw)) + raw + _BE64.pack(length))
    return _BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE) + b"".join(parts)


def _ram_addr(block: str | None, offset: int, flag: int, page_size: int) -> bytes:
    _check_page_size(page_size)
    if offset < 0 or offset % page_size:
        raise ValueError(f"RAM offset {offset:#x} is not a multiple of the page size {page_size}")
    if block is None:
        return _BE64.pack(offset | flag | RAM_SAVE_FLAG_CONTINUE)
    raw = _ascii("RAM block id", block, 255)
    if not raw:
        raise ValueError("RAM block id must not be empty")
    return _BE64.pack(offset | flag) + _U8.pack(len(raw)) + raw


def ram_zero_page(block: str | None, offset: int, page_size: int = 4096) -> bytes:
    """RAM_SAVE_FLAG_ZERO record with fill byte 0; ``block`` None sets CONTINUE (same block as before)."""
    return _ram_addr(block, offset, RAM_SAVE_FLAG_ZERO, page_size) + b"\0"


def ram_page(block: str | None, offset: int, data: Buffer, page_size: int = 4096) -> bytes:
    """RAM_SAVE_FLAG_PAGE record with the page's ``page_size`` raw bytes; ``block`` None sets CONTINUE."""
    if memoryview(data).nbytes != page_size:
        raise ValueError(f"RAM page data is {memoryview(data).nbytes} bytes, expected {page_size}")
    return _ram_addr(block, offset, RAM_SAVE_FLAG_PAGE, page_size) + bytes(data)


def ram_multifd_flush() -> bytes:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH (0x200): the receiver syncs with every multifd channel here."""
    return _BE64.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def ram_eos() -> bytes:
    """RAM_SAVE_FLAG_EOS (0x10): end of this section's RAM records."""
    return _BE64.pack(RAM_SAVE_FLAG_EOS)


def blob(data: Buffer, max_len: int = MAX_BLOB) -> bytes:
    """The payload of a livemig section: be32 length, then the bytes (at most ``max_len``)."""
    size = memoryview(data).nbytes
    if size > max_len:
        raise ValueError(f"livemig blob of {size} bytes exceeds {max_len}")
    return _BE32.pack(size) + bytes(data)


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class Header:
    """The file header was valid; ``version`` is 3."""

    version: int


@dataclass(frozen=True)
class Configuration:
    """The CONFIGURATION record: the source's machine type (comparing it is the caller's policy)."""

    machine_type: str


@dataclass(frozen=True)
class SectionStart:
    """SECTION_START: a live section opens; its payload events and then a checked footer follow."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionFull:
    """SECTION_FULL: a whole section in one record (same fields as :class:`SectionStart`)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionPart:
    """SECTION_PART of a section opened by :class:`SectionStart`."""

    section_id: int


@dataclass(frozen=True)
class SectionEnd:
    """SECTION_END of a section opened by :class:`SectionStart`; the section is closed after it."""

    section_id: int


@dataclass(frozen=True)
class MemSize:
    """RAM_SAVE_FLAG_MEM_SIZE: the source's RAM blocks as (id, used_length), in wire order."""

    blocks: list[tuple[str, int]]


@dataclass(frozen=True)
class ZeroPage:
    """RAM_SAVE_FLAG_ZERO: the page at ``offset`` in ``block`` is all zero (block resolved, never None)."""

    block: str
    offset: int


@dataclass(frozen=True)
class Page:
    """RAM_SAVE_FLAG_PAGE: ``data`` (one page) belongs at ``offset`` in ``block``."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class MultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: wait for one SYNC packet on every multifd channel, then release them."""


@dataclass(frozen=True)
class Eos:
    """RAM_SAVE_FLAG_EOS: the end of this section's RAM records (no sync in per-round mode)."""


@dataclass(frozen=True)
class Blob:
    """The payload of a livemig section (idstr starting with "livemig/")."""

    section_id: int
    idstr: str
    data: bytes


@dataclass(frozen=True)
class SwitchoverStart:
    """COMMAND SWITCHOVER_START: the source stopped the guest; the final sections follow."""


@dataclass(frozen=True)
class Command:
    """A COMMAND the reader accepts but gives no meaning to: OPEN_RETURN_PATH (1) or PING (2, be32 data)."""

    cmd: int
    data: bytes


@dataclass(frozen=True)
class Eof:
    """QEMU_VM_EOF: the device stream is complete. A VmDescription or the end of the connection follows."""


@dataclass(frozen=True)
class VmDescription:
    """The VMDESCRIPTION JSON after EOF (surfaced, not interpreted)."""

    json_text: str


@dataclass(frozen=True)
class Closed:
    """The peer closed the stream (``feed(b"")``) at a point where that is allowed: after Eof."""


Event: TypeAlias = (
    Header
    | Configuration
    | SectionStart
    | SectionFull
    | SectionPart
    | SectionEnd
    | MemSize
    | ZeroPage
    | Page
    | MultifdFlush
    | Eos
    | Blob
    | SwitchoverStart
    | Command
    | Eof
    | VmDescription
    | Closed
)


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"


#: returned by :meth:`StreamReader.next_event` when the buffered bytes hold no complete event
NEED_DATA: Final = NeedData.NEED_DATA


# ---------------------------------------------------------------------------------------------
# Reader


class _State(enum.Enum):
    HEADER = "header"  # expecting the 8-byte file header
    TOP = "top"  # expecting a top-level record
    RAM = "ram"  # inside the "ram" section, expecting a RAM record
    MEM_SIZE = "mem_size"  # inside a MEM_SIZE record, expecting a block entry
    BLOB = "blob"  # inside a livemig section, expecting its blob
    FOOTER = "footer"  # expecting the footer of the current section
    AFTER_EOF = "after_eof"  # after QEMU_VM_EOF: a VMDESCRIPTION or the end
    DONE = "done"  # after the VMDESCRIPTION: only the end may follow


@dataclass
class _Section:
    idstr: str
    instance_id: int
    version_id: int
    is_open: bool


class StreamReader:
    """Sans-IO parser of the main migration stream (module docstring for the grammar).

    ``feed(data)`` appends bytes; ``feed(b"")`` says the peer closed. ``next_event()`` returns the
    next complete :data:`Event` or :data:`NEED_DATA`. Each call returns at most one event (section
    footers are checked and consumed silently); a record is consumed only once it is complete, so
    any chunking yields the same events and errors. Cost:
    amortized O(bytes) (a bytearray with a read offset, compacted when more than half is consumed);
    a Page or Blob is copied once out of the buffer.

    Raises :class:`~livemig.errors.WireError` for anything outside the grammar, or a close in the
    middle of a record; from then on every call raises again. ``page_size`` is the target page
    size (RAM flags live below it); ``max_blob`` bounds livemig blobs.
    """

    def __init__(self, *, page_size: int = 4096, max_blob: int = MAX_BLOB) -> None:
        _check_page_size(page_size)
        self.page_size = page_size
        self.max_blob = max_blob
        self._buf = bytearray()
        self._pos = 0
        self._closed = False
        self._error: WireError | None = None
        self._state = _State.HEADER
        self._records = 0  # top-level records seen, for "CONFIGURATION must come first"
        self._sections: dict[int, _Section] = {}
        self._current: int | None = None  # section id whose payload/footer is being parsed
        self._blocks: dict[str, int] | None = None  # MEM_SIZE table
        self._last_block: str | None = None  # for RAM_SAVE_FLAG_CONTINUE
        self._mem_total = 0
        self._mem_left = 0
        self._mem_list: list[tuple[str, int]] = []
        self._handlers: dict[_State, Callable[[], Event | None]] = {
            _State.HEADER: self._read_header,
            _State.TOP: self._read_top,
            _State.RAM: self._read_ram,
            _State.MEM_SIZE: self._read_mem_size_block,
            _State.BLOB: self._read_blob,
            _State.FOOTER: self._read_footer,
            _State.AFTER_EOF: self._read_after_eof,
            _State.DONE: self._read_done,
        }

    # -- public -------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed by an event."""
        return len(self._buf) - self._pos

    @property
    def blocks(self) -> dict[str, int]:
        """The RAM blocks declared by MEM_SIZE so far (id -> used_length); empty before it."""
        return dict(self._blocks or {})

    def feed(self, data: Buffer) -> None:
        """Append received bytes; ``b""`` marks the end of the stream (feeding after it: ValueError)."""
        self._check_usable()
        if self._closed:
            raise ValueError("StreamReader.feed() after the end of the stream was fed")
        if not len(data):
            self._closed = True
            return
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The next event, or NEED_DATA; raises WireError on a malformed stream (and ever after)."""
        self._check_usable()
        try:
            event = self._handlers[self._state]()
        except WireError as exc:
            self._error = exc
            raise
        if event is not None:
            return event
        if self._closed:
            self._error = self._truncated()
            raise self._error
        return NEED_DATA

    # -- buffer helpers -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise WireError(
                f"main stream: reader unusable after an earlier error: {self._error}"
            ) from self._error

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos : self._pos + n])
        self._pos += n
        return out

    def _truncated(self) -> WireError:
        where = f"state {self._state.value}"
        if self._current is not None:
            where += f", section {self._current} ({self._sections[self._current].idstr!r})"
        if not self._avail():
            return WireError.with_values(
                f"main stream: connection closed before QEMU_VM_EOF ({where}), expected more records",
                "end of stream",
                "QEMU_VM_EOF",
            )
        return WireError.with_values(
            f"main stream: connection closed in the middle of a record ({where}; "
            f"{self._avail()} bytes of an incomplete record buffered)",
            "end of stream",
            "the rest of the record",
        )

    # -- states -------------------------------------------------------------------------------

    def _read_header(self) -> Event | None:
        if self._avail() < _FILE_HEADER.size:
            return None
        magic, version = _FILE_HEADER.unpack_from(self._buf, self._pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise WireError.with_values(
                f"main stream: received file magic {magic:#010x}, "
                f'expected {QEMU_VM_FILE_MAGIC:#010x} ("QEVM")',
                magic,
                QEMU_VM_FILE_MAGIC,
            )
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise WireError.with_values(
                "main stream: SaveVM v2 format is obsolete and no longer supported "
                f"(received file version {version}, expected {QEMU_VM_FILE_VERSION})",
                version,
                QEMU_VM_FILE_VERSION,
            )
        if version != QEMU_VM_FILE_VERSION:
            raise WireError.with_values(
                f"main stream: received file version {version}, expected {QEMU_VM_FILE_VERSION}",
                version,
                QEMU_VM_FILE_VERSION,
            )
        self._pos += _FILE_HEADER.size
        self._state = _State.TOP
        return Header(version)

    def _read_top(self) -> Event | None:
        if not self._avail():
            return None
        kind = self._buf[self._pos]
        if kind == QEMU_VM_CONFIGURATION:
            event: Event | None = self._read_configuration()
        elif kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            event = self._read_section_long(kind)
        elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            event = self._read_section_short(kind)
        elif kind == QEMU_VM_COMMAND:
            event = self._read_command()
        elif kind == QEMU_VM_EOF:
            self._pos += 1
            self._state = _State.AFTER_EOF
            event = Eof()
        elif kind == QEMU_VM_SUBSECTION:
            raise WireError.with_values(
                "main stream: received record type 0x05 (SUBSECTION) outside a vmstate; configuration "
                "subsections are not supported, expected a section, command or EOF",
                kind,
                "a top-level record type",
            )
        elif kind == QEMU_VM_SECTION_FOOTER:
            raise WireError.with_values(
                "main stream: received a section footer (0x7e) outside a section, "
                "expected a section, command or EOF",
                kind,
                "a top-level record type",
            )
        else:
            raise WireError.with_values(
                f"main stream: received unknown record type {kind:#04x}, "
                "expected one of 0x00-0x04, 0x07, 0x08",
                kind,
                "a top-level record type",
            )
        if event is not None:
            self._records += 1
        return event

    def _read_configuration(self) -> Event | None:
        if self._records:
            raise WireError.with_values(
                "main stream: received CONFIGURATION (0x07) after other records, "
                "expected it right after the header",
                QEMU_VM_CONFIGURATION,
                "the first record",
            )
        if self._avail() < _TYPE_LEN.size:
            return None
        _, length = _TYPE_LEN.unpack_from(self._buf, self._pos)
        if length > MAX_MACHINE_TYPE:
            raise WireError.with_values(
                f"main stream: received machine type length {length}, expected at most {MAX_MACHINE_TYPE}",
                length,
                f"<= {MAX_MACHINE_TYPE}",
            )
        if self._avail() < _TYPE_LEN.size + length:
            return None
        self._pos += _TYPE_LEN.size
        raw = self._take(length)
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise WireError.with_values(
                f"main stream: received machine type {raw!r} that is not ASCII", raw, "ASCII"
            ) from exc
        return Configuration(name)

    def _read_section_long(self, kind: int) -> Event | None:
        fixed = _SECTION_LONG.size
        if self._avail() < fixed:
            return None
        _, section_id, idlen = _SECTION_LONG.unpack_from(self._buf, self._pos)
        if self._avail() < fixed + idlen + _SECTION_TAIL.size:
            return None
        raw = bytes(self._buf[self._pos + fixed : self._pos + fixed + idlen])
        instance_id, version_id = _SECTION_TAIL.unpack_from(self._buf, self._pos + fixed + idlen)
        try:
            idstr = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise WireError.with_values(
                f"main stream: received section idstr {raw!r} that is not ASCII", raw, "ASCII"
            ) from exc
        kind_name = "SECTION_START" if kind == QEMU_VM_SECTION_START else "SECTION_FULL"
        if idstr == RAM_SECTION_IDSTR:
            if version_id != RAM_SECTION_VERSION:
                raise WireError.with_values(
                    f"main stream: received section 'ram' version {version_id}, "
                    f"expected {RAM_SECTION_VERSION}",
                    version_id,
                    RAM_SECTION_VERSION,
                )
            if instance_id != 0:
                raise WireError.with_values(
                    f"main stream: received section 'ram' instance {instance_id}, expected 0", instance_id, 0
                )
            payload = _State.RAM
        elif idstr.startswith(LIVEMIG_SECTION_PREFIX) and len(idstr) > len(LIVEMIG_SECTION_PREFIX):
            payload = _State.BLOB
        else:
            raise WireError.with_values(
                f"main stream: received {kind_name} of unknown section {idstr!r} (instance {instance_id}, "
                f"section id {section_id}), expected 'ram' or '{LIVEMIG_SECTION_PREFIX}<name>'",
                idstr,
                f"'ram' or '{LIVEMIG_SECTION_PREFIX}<name>'",
            )
        known = self._sections.get(section_id)
        if known is not None and (known.idstr, known.instance_id) != (idstr, instance_id):
            raise WireError.with_values(
                f"main stream: received {kind_name} for section id {section_id} as {idstr!r} instance "
                f"{instance_id}, expected {known.idstr!r} instance {known.instance_id} (the id is taken)",
                (idstr, instance_id),
                (known.idstr, known.instance_id),
            )
        if known is not None and known.is_open:
            raise WireError.with_values(
                f"main stream: received {kind_name} for section id {section_id} ({idstr!r}) "
                "that is already open, "
                "expected SECTION_PART or SECTION_END",
                kind,
                "SECTION_PART or SECTION_END",
            )
        self._pos += fixed + idlen + _SECTION_TAIL.size
        self._sections[section_id] = _Section(idstr, instance_id, version_id, kind == QEMU_VM_SECTION_START)
        self._current = section_id
        self._state = payload
        if kind == QEMU_VM_SECTION_START:
            return SectionStart(section_id, idstr, instance_id, version_id)
        return SectionFull(section_id, idstr, instance_id, version_id)

    def _read_section_short(self, kind: int) -> Event | None:
        if self._avail() < _SECTION_SHORT.size:
            return None
        _, section_id = _SECTION_SHORT.unpack_from(self._buf, self._pos)
        kind_name = "SECTION_PART" if kind == QEMU_VM_SECTION_PART else "SECTION_END"
        section = self._sections.get(section_id)
        if section is None:
            raise WireError.with_values(
                f"main stream: received {kind_name} for unknown section id {section_id}, "
                f"expected one of {sorted(self._sections)} (opened by SECTION_START)",
                section_id,
                sorted(self._sections),
            )
        if not section.is_open:
            raise WireError.with_values(
                f"main stream: received {kind_name} for section id {section_id} ({section.idstr!r}) "
                "that is not "
                "open, expected a SECTION_START first",
                section_id,
                "an open section",
            )
        self._pos += _SECTION_SHORT.size
        self._current = section_id
        self._state = _State.RAM if section.idstr == RAM_SECTION_IDSTR else _State.BLOB
        if kind == QEMU_VM_SECTION_END:
            section.is_open = False
            return SectionEnd(section_id)
        return SectionPart(section_id)

    def _read_command(self) -> Event | None:
        if self._avail() < _COMMAND.size:
            return None
        _, cmd, length = _COMMAND.unpack_from(self._buf, self._pos)
        expected = _COMMAND_LENGTHS.get(cmd)
        if expected is None:
            name = _COMMAND_NAMES.get(cmd, "unknown")
            raise WireError.with_values(
                f"main stream: received COMMAND {cmd} ({name}), expected OPEN_RETURN_PATH (1), PING (2) or "
                "SWITCHOVER_START (11): postcopy, COLO and packaged streams are not supported",
                cmd,
                sorted(_COMMAND_LENGTHS),
            )
        if length != expected:
            raise WireError.with_values(
                f"main stream: received COMMAND {cmd} ({_COMMAND_NAMES[cmd]}) with length {length}, "
                f"expected {expected}",
                length,
                expected,
            )
        if self._avail() < _COMMAND.size + length:
            return None
        self._pos += _COMMAND.size
        data = self._take(length)
        if cmd == MIG_CMD_SWITCHOVER_START:
            return SwitchoverStart()
        return Command(cmd, data)

    def _read_footer(self) -> Event | None:
        if self._avail() < _SECTION_SHORT.size:
            if self._avail() and self._buf[self._pos] != QEMU_VM_SECTION_FOOTER:
                raise self._bad_footer_type()
            return None
        kind, section_id = _SECTION_SHORT.unpack_from(self._buf, self._pos)
        if kind != QEMU_VM_SECTION_FOOTER:
            raise self._bad_footer_type()
        if section_id != self._current:
            raise WireError.with_values(
                f"main stream: received section footer for section id {section_id}, expected {self._current}",
                section_id,
                self._current,
            )
        self._pos += _SECTION_SHORT.size
        self._current = None
        self._state = _State.TOP
        return self._read_top()

    def _bad_footer_type(self) -> WireError:
        kind = self._buf[self._pos]
        return WireError.with_values(
            f"main stream: received record type {kind:#04x} after the payload of section {self._current}, "
            f"expected the section footer {QEMU_VM_SECTION_FOOTER:#04x}",
            kind,
            QEMU_VM_SECTION_FOOTER,
        )

    def _read_blob(self) -> Event | None:
        if self._avail() < _BE32.size:
            return None
        (length,) = _BE32.unpack_from(self._buf, self._pos)
        assert self._current is not None
        idstr = self._sections[self._current].idstr
        if length > self.max_blob:
            raise WireError.with_values(
                f"main stream: received a {length}-byte blob in section {self._current} ({idstr!r}), "
                f"expected at most {self.max_blob}",
                length,
                f"<= {self.max_blob}",
            )
        if self._avail() < _BE32.size + length:
            return None
        self._pos += _BE32.size
        data = self._take(length)
        self._state = _State.FOOTER
        return Blob(self._current, idstr, data)

    def _read_after_eof(self) -> Event | None:
        if not self._avail():
            if self._closed:
                self._state = _State.DONE
                return Closed()
            return None
        kind = self._buf[self._pos]
        if kind != QEMU_VM_VMDESCRIPTION:
            raise WireError.with_values(
                f"main stream: received record type {kind:#04x} after EOF, expected VMDESCRIPTION "
                f"({QEMU_VM_VMDESCRIPTION:#04x}) or the end of the stream",
                kind,
                QEMU_VM_VMDESCRIPTION,
            )
        if self._avail() < _TYPE_LEN.size:
            return None
        _, length = _TYPE_LEN.unpack_from(self._buf, self._pos)
        if length > MAX_VMDESC:
            raise WireError.with_values(
                f"main stream: received VMDESCRIPTION of {length} bytes, expected at most {MAX_VMDESC}",
                length,
                f"<= {MAX_VMDESC}",
            )
        if self._avail() < _TYPE_LEN.size + length:
            return None
        self._pos += _TYPE_LEN.size
        raw = self._take(length)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError.with_values(
                f"main stream: VMDESCRIPTION is not UTF-8 ({exc.reason} at byte {exc.start})",
                raw[:32],
                "UTF-8 JSON",
            ) from exc
        self._state = _State.DONE
        return VmDescription(text)

    def _read_done(self) -> Event | None:
        if self._avail():
            kind = self._buf[self._pos]
            raise WireError.with_values(
                f"main stream: received {self._avail()} bytes (first {kind:#04x}) after the VMDESCRIPTION, "
                "expected the end of the stream",
                kind,
                "end of stream",
            )
        if self._closed:
            return Closed()
        return None

    # -- RAM section --------------------------------------------------------------------------

    def _read_ram(self) -> Event | None:
        if self._avail() < _BE64.size:
            return None
        (word,) = _BE64.unpack_from(self._buf, self._pos)
        flags = word & (self.page_size - 1)
        addr = word & ~(self.page_size - 1)
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind not in _RAM_TYPES:
            for bit, name in _RAM_REFUSED.items():
                if flags & bit:
                    raise WireError.with_values(
                        f"RAM: received record flags {flags:#x} with {name}, which livemig does not support; "
                        "expected ZERO, MEM_SIZE, PAGE, EOS or MULTIFD_FLUSH",
                        flags,
                        "one of 0x02, 0x04, 0x08, 0x10, 0x200 (| 0x20)",
                    )
            raise WireError.with_values(
                f"RAM: Unknown combination of migration flags: {flags:#x} (record {word:#018x}), "
                "expected one of ZERO 0x02, MEM_SIZE 0x04, PAGE 0x08, EOS 0x10, MULTIFD_FLUSH 0x200, "
                "with CONTINUE 0x20 only on ZERO/PAGE",
                flags,
                "one of 0x02, 0x04, 0x08, 0x10, 0x200 (| 0x20)",
            )
        cont = bool(flags & RAM_SAVE_FLAG_CONTINUE)
        if cont and kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
            raise WireError.with_values(
                f"RAM: Unknown combination of migration flags: {flags:#x}, CONTINUE (0x20) expected only "
                "with ZERO or PAGE",
                flags,
                "CONTINUE only with ZERO/PAGE",
            )
        if kind in (RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MULTIFD_FLUSH):
            name = "EOS" if kind == RAM_SAVE_FLAG_EOS else "MULTIFD_FLUSH"
            if addr:
                raise WireError.with_values(f"RAM: received {name} record with address {addr:#x}, expected 0", addr, 0)
            self._pos += _BE64.size
            if kind == RAM_SAVE_FLAG_EOS:
                self._state = _State.FOOTER
                return Eos()
            return MultifdFlush()
        if kind == RAM_SAVE_FLAG_MEM_SIZE:
            if self._blocks is not None:
                raise WireError.with_values(
                    "RAM: received a second MEM_SIZE record, expected it once, in the setup section",
                    "MEM_SIZE",
                    "one MEM_SIZE",
                )
            self._pos += _BE64.size
            self._mem_total = addr
            self._mem_left = addr
            self._mem_list = []
            self._state = _State.MEM_SIZE
            return self._read_mem_size_block()
        return self._read_page_record(kind, addr, cont)

    def _read_mem_size_block(self) -> Event | None:
        if not self._mem_left:
            self._blocks = dict(self._mem_list)
            self._state = _State.RAM
            return MemSize(list(self._mem_list))
        if self._avail() < 1:
            return None
        idlen = self._buf[self._pos]
        if idlen == 0:
            raise WireError.with_values(
                f"RAM: MEM_SIZE lists an empty block id with {self._mem_left} of {self._mem_total} "
                "bytes undeclared, "
                "expected a block id of 1..255 bytes",
                0,
                "1..255",
            )
        if self._avail() < 1 + idlen + _BE64.size:
            return None
        raw = bytes(self._buf[self._pos + 1 : self._pos + 1 + idlen])
        (length,) = _BE64.unpack_from(self._buf, self._pos + 1 + idlen)
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise WireError.with_values(f"RAM: MEM_SIZE block id {raw!r} is not ASCII", raw, "ASCII") from exc
        if any(name == known for known, _ in self._mem_list):
            raise WireError.with_values(f"RAM: MEM_SIZE lists block {name!r} twice", name, "unique block ids")
        if length > self._mem_left:
            raise WireError.with_values(
                f"RAM: MEM_SIZE block {name!r} of {length} bytes exceeds the {self._mem_left} "
                "bytes left of the "
                f"declared total {self._mem_total}",
                length,
                f"<= {self._mem_left}",
            )
        if len(self._mem_list) >= MAX_RAM_BLOCKS:
            raise WireError.with_values(
                f"RAM: MEM_SIZE lists more than {MAX_RAM_BLOCKS} blocks",
                len(self._mem_list) + 1,
                MAX_RAM_BLOCKS,
            )
        self._pos += 1 + idlen + _BE64.size
        self._mem_list.append((name, length))
        self._mem_left -= length
        return self._read_mem_size_block()

    def _read_page_record(self, kind: int, addr: int, cont: bool) -> Event | None:
        pos = self._pos + _BE64.size
        if cont:
            if self._last_block is None:
                raise WireError.with_values(
                    f"RAM: received a record with CONTINUE (0x20) at offset {addr:#x} "
                    "before any block was named, "
                    "expected a block id first",
                    "CONTINUE",
                    "a named block",
                )
            block = self._last_block
        else:
            if self._avail() < _BE64.size + 1:
                return None
            idlen = self._buf[pos]
            if self._avail() < _BE64.size + 1 + idlen:
                return None
            raw = bytes(self._buf[pos + 1 : pos + 1 + idlen])
            pos += 1 + idlen
            try:
                block = raw.decode("ascii")
            except UnicodeDecodeError as exc:
                raise WireError.with_values(f"RAM: received block id {raw!r} that is not ASCII", raw, "ASCII") from exc
        # Validate as soon as the block and offset are known, before waiting for the page data.
        blocks = self._blocks or {}
        length = blocks.get(block)
        if length is None:
            raise WireError.with_values(
                f"RAM: Unknown ramblock {block!r}, cannot accept migration "
                f"(expected a block declared by MEM_SIZE: {sorted(blocks)})",
                block,
                sorted(blocks),
            )
        if addr > length - self.page_size:
            raise WireError.with_values(
                f"RAM: offset {addr:#x} is outside block {block!r} of {length:#x} bytes "
                f"(max {max(length - self.page_size, 0):#x})",
                addr,
                f"<= {length - self.page_size:#x}",
            )
        tail = 1 if kind == RAM_SAVE_FLAG_ZERO else self.page_size
        if len(self._buf) - pos < tail:
            return None
        self._last_block = block
        if kind == RAM_SAVE_FLAG_ZERO:
            fill = self._buf[pos]
            if fill != 0:
                raise WireError.with_values(
                    f"RAM: Found a zero page with value {fill} at offset {addr:#x} of block {block!r}, "
                    "expected 0",
                    fill,
                    0,
                )
            self._pos = pos + 1
            return ZeroPage(block, addr)
        self._pos = pos
        return Page(block, addr, self._take(self.page_size))
