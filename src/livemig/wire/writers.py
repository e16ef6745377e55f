"""Main-stream record writers: pure functions, each returning the bytes of one record.

The record layouts are in docs/wire.md, "Main stream"; the grammar of what livemig writes, in
order, is in :mod:`livemig.wire.stream`. Arguments the format cannot carry (a name that is not
ASCII or too long, a page of the wrong size, an unaligned offset, a value too large for its length
field) raise :class:`~livemig.errors.LocalWireError` before any byte is produced.
"""

from __future__ import annotations

from livemig._types import Buffer
from livemig.errors import LocalWireError
from livemig.wire.constants import (
    MAX_DISCARDS_PER_COMMAND,
    MIG_CMD_OPEN_RETURN_PATH,
    MIG_CMD_PING,
    MIG_CMD_POSTCOPY_ADVISE,
    MIG_CMD_POSTCOPY_LISTEN,
    MIG_CMD_POSTCOPY_RAM_DISCARD,
    MIG_CMD_POSTCOPY_RESUME,
    MIG_CMD_POSTCOPY_RUN,
    MIG_CMD_RECV_BITMAP,
    MIG_CMD_SWITCHOVER_START,
    PAGE_SIZE,
    POSTCOPY_RAM_DISCARD_VERSION,
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
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)
from livemig.wire.layout import (
    BE32,
    BE64,
    COMMAND,
    FILE_HEADER,
    MAX_BLOB,
    MAX_COMMAND_DATA,
    MAX_ID,
    MAX_MACHINE_TYPE,
    MAX_VMDESC,
    SECTION_LONG,
    SECTION_SHORT,
    SECTION_TAIL,
    TYPE_LEN,
    U8,
    check_page_size,
)


def _ascii(what: str, text: str, max_len: int) -> bytes:
    """``text`` as 1..max_len ASCII bytes, or LocalWireError naming ``what``."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise LocalWireError(f"{what} {text!r} is not ASCII") from exc
    if not 0 < len(raw) <= max_len:
        raise LocalWireError(f"{what} {text!r} is {len(raw)} bytes, expected 1..{max_len}")
    return raw


def file_header() -> bytes:
    """QEMU_VM_FILE_MAGIC "QEVM" and QEMU_VM_FILE_VERSION 3 (8 bytes)."""
    return FILE_HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def configuration(machine_type: str) -> bytes:
    """The CONFIGURATION record: 0x07, be32 length, the machine type name (ASCII, no NUL), no subsections."""
    name = _ascii("machine type", machine_type, MAX_MACHINE_TYPE)
    return TYPE_LEN.pack(QEMU_VM_CONFIGURATION, len(name)) + name


def _section_long(kind: int, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    name = _ascii("section idstr", idstr, MAX_ID)
    return SECTION_LONG.pack(kind, section_id, len(name)) + name + SECTION_TAIL.pack(instance_id, version_id)


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
    return SECTION_SHORT.pack(QEMU_VM_SECTION_PART, section_id)


def section_end(section_id: int) -> bytes:
    """SECTION_END header: 0x03, be32 section id."""
    return SECTION_SHORT.pack(QEMU_VM_SECTION_END, section_id)


def section_footer(section_id: int) -> bytes:
    """SECTION_FOOTER: 0x7e, be32 section id (after every START/PART/END/FULL payload)."""
    return SECTION_SHORT.pack(QEMU_VM_SECTION_FOOTER, section_id)


def eof() -> bytes:
    """QEMU_VM_EOF: the end of the device stream."""
    return bytes([QEMU_VM_EOF])


def vm_description(json_text: str) -> bytes:
    """VMDESCRIPTION (0x06, be32 length, JSON text), written after :func:`eof`."""
    raw = json_text.encode("utf-8")
    if len(raw) > MAX_VMDESC:
        raise LocalWireError(f"VMDESCRIPTION of {len(raw)} bytes exceeds {MAX_VMDESC}")
    return TYPE_LEN.pack(QEMU_VM_VMDESCRIPTION, len(raw)) + raw


def command(cmd: int, data: bytes = b"") -> bytes:
    """A COMMAND record: 0x08, be16 cmd, be16 len, data (no check of cmd: see the named helpers)."""
    if len(data) > MAX_COMMAND_DATA:
        raise LocalWireError(f"command data of {len(data)} bytes exceeds {MAX_COMMAND_DATA}")
    return COMMAND.pack(QEMU_VM_COMMAND, cmd, len(data)) + bytes(data)


def switchover_start() -> bytes:
    """COMMAND SWITCHOVER_START (11, no data): the source paused the guest, the final sections follow."""
    return command(MIG_CMD_SWITCHOVER_START)


def open_return_path() -> bytes:
    """COMMAND OPEN_RETURN_PATH (1, no data)."""
    return command(MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    """COMMAND PING (2, be32 value)."""
    return command(MIG_CMD_PING, BE32.pack(value))


def postcopy_advise(page_size_summary: int, target_page_size: int) -> bytes:
    """COMMAND POSTCOPY_ADVISE (3) in its 16-byte form: be64 the OR of every RAM block's page size,
    be64 the target page size. The destination checks it can serve faults (userfaultfd) now."""
    return command(MIG_CMD_POSTCOPY_ADVISE, BE64.pack(page_size_summary) + BE64.pack(target_page_size))


def postcopy_listen() -> bytes:
    """COMMAND POSTCOPY_LISTEN (4, no data): the destination registers its RAM for faults."""
    return command(MIG_CMD_POSTCOPY_LISTEN)


def postcopy_run() -> bytes:
    """COMMAND POSTCOPY_RUN (5, no data): the device state is complete, the destination runs the guest."""
    return command(MIG_CMD_POSTCOPY_RUN)


def postcopy_resume() -> bytes:
    """COMMAND POSTCOPY_RESUME (9, no data): a paused post-copy goes on, on this main channel."""
    return command(MIG_CMD_POSTCOPY_RESUME)


def recv_bitmap(block: str) -> bytes:
    """COMMAND RECV_BITMAP (10): u8 length and the RAM block id (no terminator): the destination
    answers which pages of ``block`` it has."""
    raw = _ascii("RAM block id", block, MAX_ID)
    return command(MIG_CMD_RECV_BITMAP, U8.pack(len(raw)) + raw)


def postcopy_ram_discard(block: str, ranges: list[tuple[int, int]]) -> bytes:
    """COMMAND POSTCOPY_RAM_DISCARD (6) records dropping ``ranges`` ((start, length) in bytes) of RAM
    block ``block``: u8 version 0, u8 len, the id, a 0 byte, then be64 start / be64 length pairs, at
    most :data:`MAX_DISCARDS_PER_COMMAND` pairs per command (as many commands as needed; b"" for no
    range). LocalWireError for a bad id or a negative start or length."""
    raw = _ascii("RAM block id", block, MAX_ID)
    head = U8.pack(POSTCOPY_RAM_DISCARD_VERSION) + U8.pack(len(raw)) + raw + b"\0"
    out = []
    for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
        body = b"".join(_discard_range(start, length) for start, length in ranges[i:i + MAX_DISCARDS_PER_COMMAND])
        out.append(command(MIG_CMD_POSTCOPY_RAM_DISCARD, head + body))
    return b"".join(out)


def _discard_range(start: int, length: int) -> bytes:
    if start < 0 or length <= 0:
        raise LocalWireError(f"discard range start {start} length {length}: expected start >= 0, length > 0")
    return BE64.pack(start) + BE64.pack(length)


def ram_mem_size(blocks: list[tuple[str, int]], page_size: int = PAGE_SIZE) -> bytes:
    """RAM_SAVE_FLAG_MEM_SIZE: be64 (total | 0x04), then per block u8 len, id, be64 used_length.

    Each length must be a multiple of ``page_size`` (so the total does not spill into the flag
    bits); ids are 1..255 ASCII bytes and unique. Raises LocalWireError otherwise.
    """
    check_page_size(page_size)
    parts = []
    seen: set[str] = set()
    total = 0
    for name, length in blocks:
        raw = _ascii("RAM block id", name, MAX_ID)
        if name in seen:
            raise LocalWireError(f"RAM block id {name!r} is listed twice")
        if length < 0 or length % page_size:
            raise LocalWireError(f"RAM block {name!r} length {length} is not a multiple of the page size {page_size}")
        seen.add(name)
        total += length
        parts.append(U8.pack(len(raw)) + raw + BE64.pack(length))
    return BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE) + b"".join(parts)


def _ram_addr(block: str | None, offset: int, flag: int, page_size: int) -> bytes:
    check_page_size(page_size)
    if offset < 0 or offset % page_size:
        raise LocalWireError(f"RAM offset {offset:#x} is not a multiple of the page size {page_size}")
    if block is None:
        return BE64.pack(offset | flag | RAM_SAVE_FLAG_CONTINUE)
    raw = _ascii("RAM block id", block, MAX_ID)
    return BE64.pack(offset | flag) + U8.pack(len(raw)) + raw


def ram_zero_page(block: str | None, offset: int, page_size: int = PAGE_SIZE) -> bytes:
    """RAM_SAVE_FLAG_ZERO record with fill byte 0; ``block`` None sets CONTINUE (same block as before)."""
    return _ram_addr(block, offset, RAM_SAVE_FLAG_ZERO, page_size) + b"\0"


def ram_page(block: str | None, offset: int, data: Buffer, page_size: int = PAGE_SIZE) -> bytes:
    """RAM_SAVE_FLAG_PAGE record with the page's ``page_size`` raw bytes; ``block`` None sets CONTINUE."""
    size = memoryview(data).nbytes
    if size != page_size:
        raise LocalWireError(f"RAM page data is {size} bytes, expected {page_size}")
    return _ram_addr(block, offset, RAM_SAVE_FLAG_PAGE, page_size) + bytes(data)


def ram_multifd_flush() -> bytes:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH (0x200): the receiver syncs with every multifd channel here."""
    return BE64.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)


def ram_eos() -> bytes:
    """RAM_SAVE_FLAG_EOS (0x10): end of this section's RAM records."""
    return BE64.pack(RAM_SAVE_FLAG_EOS)


def blob(data: Buffer, max_len: int = MAX_BLOB) -> bytes:
    """The payload of a livemig section: be32 length, then the bytes (at most ``max_len``)."""
    size = memoryview(data).nbytes
    if size > max_len:
        raise LocalWireError(f"livemig blob of {size} bytes exceeds {max_len}")
    return BE32.pack(size) + bytes(data)
