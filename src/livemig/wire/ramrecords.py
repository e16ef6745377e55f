"""The RAM section's records, parsed for :class:`~livemig.wire.reader.StreamReader` (sans-IO).

A mixin: :class:`RamRecords` holds the handlers of the reader's RAM and MEM_SIZE states and the
block table; the reader owns the buffer and the state machine. Record layouts: docs/wire.md,
"Main stream".
"""

from __future__ import annotations

import enum
from typing import Final

from livemig.errors import WireError
from livemig.wire.buffer import ReceiveBuffer
from livemig.wire.constants import (
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
)
from livemig.wire.events import Eos, Event, MemSize, MultifdFlush, Page, ZeroPage
from livemig.wire.layout import BE64, MAX_RAM_BLOCKS

#: RAM record types (flags minus CONTINUE must be exactly one of these)
_RAM_TYPES: Final = (
    RAM_SAVE_FLAG_ZERO,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
)
_RAM_EXPECTED: Final = "ZERO 0x02, MEM_SIZE 0x04, PAGE 0x08, EOS 0x10, MULTIFD_FLUSH 0x200 (ZERO, PAGE +CONTINUE 0x20)"
_RAM_REFUSED: Final = {
    RAM_SAVE_FLAG_FULL: "FULL (0x01, obsolete since 2009)",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE (0x40)",
    RAM_SAVE_FLAG_HOOK: "HOOK (0x80, RDMA only)",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE (0x100, legacy compress)",
}
#: QEMU's words for a flag word it cannot parse (ram.c, ram_load_precopy)
_QEMU_UNKNOWN_FLAGS: Final = "Unknown combination of migration flags"


def ascii_text(what: str, raw: bytes) -> str:
    """``raw`` as ASCII, or WireError naming ``what``."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise WireError(what, raw, "ASCII") from exc


class RamState(enum.Enum):
    """Where a RAM record handler leaves the reader."""

    RAM = "ram"  # inside the "ram" section, expecting a RAM record
    MEM_SIZE = "mem_size"  # inside a MEM_SIZE record, expecting a block entry
    FOOTER = "footer"  # after EOS: expecting the section footer


class RamRecords:
    """The RAM half of the reader: its handlers set :attr:`_ram_state` when they leave the RAM
    record stream (the reader maps it onto its own state)."""

    page_size: int
    _rx: ReceiveBuffer

    def _init_ram(self) -> None:
        self._blocks: dict[str, int] | None = None  # MEM_SIZE table
        self._last_block: str | None = None  # for RAM_SAVE_FLAG_CONTINUE
        self._mem_total = 0
        self._mem_left = 0
        self._mem_list: list[tuple[str, int]] = []
        self._ram_state = RamState.RAM

    def _read_ram(self) -> Event | None:
        avail = len(self._rx)
        if avail < BE64.size:
            return None
        (word,) = self._rx.unpack(BE64)
        flags = word & (self.page_size - 1)
        addr = word & ~(self.page_size - 1)
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind not in _RAM_TYPES:
            why = next((f"{n}, not supported" for bit, n in _RAM_REFUSED.items() if flags & bit), _QEMU_UNKNOWN_FLAGS)
            raise WireError("RAM: record flags", flags, _RAM_EXPECTED, hex=True, note=why)
        cont = bool(flags & RAM_SAVE_FLAG_CONTINUE)
        if cont and kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
            raise WireError("RAM: record flags", flags, _RAM_EXPECTED, hex=True, note=_QEMU_UNKNOWN_FLAGS)
        if kind in (RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MULTIFD_FLUSH):
            name = "EOS" if kind == RAM_SAVE_FLAG_EOS else "MULTIFD_FLUSH"
            if addr:
                raise WireError(f"RAM: {name} record address", addr, 0, hex=True)
            self._rx.skip(BE64.size)
            if kind == RAM_SAVE_FLAG_EOS:
                self._ram_state = RamState.FOOTER
                return Eos()
            return MultifdFlush()
        if kind == RAM_SAVE_FLAG_MEM_SIZE:
            if self._blocks is not None:
                raise WireError("RAM: a second MEM_SIZE record, expected one only, in the setup section")
            self._rx.skip(BE64.size)
            self._mem_total = addr
            self._mem_left = addr
            self._mem_list = []
            self._ram_state = RamState.MEM_SIZE
            return self._read_mem_size_block()
        return self._read_page_record(kind, addr, cont, avail)

    def _read_mem_size_block(self) -> Event | None:
        if not self._mem_left:
            self._blocks = dict(self._mem_list)
            self._ram_state = RamState.RAM
            return MemSize(list(self._mem_list))
        if not self._rx:
            return None
        idlen = self._rx.byte()
        if idlen == 0:
            why = f"{self._mem_left} of {self._mem_total} bytes not declared yet"
            raise WireError("RAM: MEM_SIZE block id length", 0, "1..255", note=why)
        if len(self._rx) < 1 + idlen + BE64.size:
            return None
        name = ascii_text("RAM: MEM_SIZE block id", self._rx.peek(1, idlen))
        (length,) = self._rx.unpack(BE64, 1 + idlen)
        if any(name == known for known, _ in self._mem_list):
            raise WireError("RAM: MEM_SIZE block id", name, "each block once", note="listed twice")
        if length > self._mem_left:
            why = f"what is left of the declared total {self._mem_total}"
            raise WireError(f"RAM: MEM_SIZE length of block {name!r}", length, f"<= {self._mem_left}", note=why)
        if len(self._mem_list) >= MAX_RAM_BLOCKS:
            raise WireError("RAM: MEM_SIZE block count", len(self._mem_list) + 1, f"<= {MAX_RAM_BLOCKS}")
        self._rx.skip(1 + idlen + BE64.size)
        self._mem_list.append((name, length))
        self._mem_left -= length
        return self._read_mem_size_block()

    def _read_page_record(self, kind: int, addr: int, cont: bool, avail: int) -> Event | None:
        at = BE64.size
        if cont:
            if self._last_block is None:
                raise WireError(f"RAM: a record with CONTINUE (0x20) at offset {addr:#x}, expected a block id first")
            block = self._last_block
        else:
            if avail < at + 1:
                return None
            idlen = self._rx.byte(at)
            if avail < at + 1 + idlen:
                return None
            block = ascii_text("RAM: block id", self._rx.peek(at + 1, idlen))
            at += 1 + idlen
        # Validate as soon as the block and offset are known, before waiting for the page data.
        blocks = self._blocks or {}
        length = blocks.get(block)
        if length is None:
            why = "Unknown ramblock, cannot accept migration"
            raise WireError("RAM: block id", block, f"one declared by MEM_SIZE: {sorted(blocks)}", note=why)
        if addr > length - self.page_size:
            limit = f"<= {max(length - self.page_size, 0):#x}"
            raise WireError(f"RAM: offset in block {block!r} of {length:#x} bytes", addr, limit, hex=True)
        tail = 1 if kind == RAM_SAVE_FLAG_ZERO else self.page_size
        if avail < at + tail:
            return None
        self._last_block = block
        if kind == RAM_SAVE_FLAG_ZERO:
            fill = self._rx.byte(at)
            if fill != 0:
                raise WireError(f"RAM: zero page fill byte at offset {addr:#x} of block {block!r}", fill, 0)
            self._rx.skip(at + 1)
            return ZeroPage(block, addr)
        self._rx.skip(at)
        return Page(block, addr, self._rx.take(self.page_size))
