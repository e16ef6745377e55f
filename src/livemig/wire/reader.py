"""The sans-IO main-stream reader: a state machine over a :class:`~livemig.wire.buffer.ReceiveBuffer`.

One handler per state; each returns the next event, or None when the buffered bytes do not hold a
complete record yet. A record is consumed only once it is complete and valid, so any chunking of
the input yields the same events and the same errors. The grammar it accepts is drawn in
:mod:`livemig.wire.stream`; the record layouts are in docs/wire.md, "Main stream".
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from livemig._types import Buffer
from livemig.errors import LocalWireError, WireError
from livemig.wire.buffer import ReceiveBuffer
from livemig.wire.constants import (
    LIVEMIG_SECTION_PREFIX,
    MIG_CMD_NAMES,
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
    QEMU_VM_FILE_VERSION_COMPAT,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    RAM_SECTION_IDSTR,
    RAM_SECTION_VERSION,
)
from livemig.wire.events import (
    NEED_DATA,
    Blob,
    Closed,
    Command,
    Configuration,
    ControlLine,
    Eof,
    Event,
    Header,
    NeedData,
    PostcopyAdvise,
    PostcopyDiscard,
    PostcopyListen,
    PostcopyResume,
    PostcopyRun,
    RecvBitmap,
    SectionEnd,
    SectionFull,
    SectionPart,
    SectionStart,
    SwitchoverStart,
    VmDescription,
)
from livemig.wire.layout import (
    BE32,
    BE64,
    COMMAND,
    FILE_HEADER,
    MAX_BLOB,
    MAX_MACHINE_TYPE,
    MAX_VMDESC,
    SECTION_LONG,
    SECTION_SHORT,
    SECTION_TAIL,
    TYPE_LEN,
    check_page_size,
)
from livemig.wire.qemu import DeviceTail, read_config_subsection
from livemig.wire.ramrecords import RamRecords, RamState, ascii_text

#: payload lengths each command the reader accepts may have (savevm.c's command table; None:
#: variable, checked by its parser)
_COMMAND_LENGTHS: Final[dict[int, tuple[int, ...] | None]] = {
    MIG_CMD_OPEN_RETURN_PATH: (0,), MIG_CMD_PING: (4,), MIG_CMD_SWITCHOVER_START: (0,),
    MIG_CMD_POSTCOPY_ADVISE: (0, 16), MIG_CMD_POSTCOPY_LISTEN: (0,), MIG_CMD_POSTCOPY_RUN: (0,),
    MIG_CMD_POSTCOPY_RAM_DISCARD: None, MIG_CMD_POSTCOPY_RESUME: (0,), MIG_CMD_RECV_BITMAP: None,
}
_COMMANDS_ACCEPTED: Final = ("OPEN_RETURN_PATH (1), PING (2), POSTCOPY_* (3-6), POSTCOPY_RESUME (9), "
                             "RECV_BITMAP (10) or SWITCHOVER_START (11)")
#: POSTCOPY_RAM_DISCARD's shortest payload: version, length, a 1-byte id, its 0, one range
_DISCARD_MIN: Final = 1 + 1 + 1 + 1 + 16
_TOP_LEVEL: Final = "a section, command or EOF (0x00-0x04, 0x07, 0x08)"
_SECTIONS_KNOWN: Final = f"'ram' or '{LIVEMIG_SECTION_PREFIX}<name>'"

#: first byte of a livemig control line (a JSON object): b"{"
CONTROL_LINE_START: Final = 0x7B


def _discard(data: bytes) -> PostcopyDiscard:
    """POSTCOPY_RAM_DISCARD's payload (its length already checked >= :data:`_DISCARD_MIN`)."""
    what = "main stream: COMMAND 6 (POSTCOPY_RAM_DISCARD)"
    if data[0] != POSTCOPY_RAM_DISCARD_VERSION:
        raise WireError(f"{what} version", data[0], POSTCOPY_RAM_DISCARD_VERSION)
    idlen = data[1]
    if idlen == 0 or 2 + idlen >= len(data):
        raise WireError(f"{what} RAM block id length", idlen, f"1..{len(data) - 3}")
    block = ascii_text(f"{what} RAM block id", data[2:2 + idlen])
    if data[2 + idlen] != 0:
        raise WireError(f"{what} byte after the RAM block id", data[2 + idlen], 0, note="the id's 0 terminator")
    body = data[3 + idlen:]
    if not body or len(body) % 16:
        raise WireError(f"{what} ranges length", len(body), "a non-zero multiple of 16 (be64 start, be64 length)")
    ranges = tuple((BE64.unpack_from(body, i)[0], BE64.unpack_from(body, i + 8)[0]) for i in range(0, len(body), 16))
    return PostcopyDiscard(block, ranges)


class _State(enum.Enum):
    HEADER = "header"  # expecting the 8-byte file header
    TOP = "top"  # expecting a top-level record
    RAM = "ram"  # inside the "ram" section, expecting a RAM record
    MEM_SIZE = "mem_size"  # inside a MEM_SIZE record, expecting a block entry
    BLOB = "blob"  # inside a livemig section, expecting its blob
    FOOTER = "footer"  # expecting the footer of the current section
    AFTER_EOF = "after_eof"  # after QEMU_VM_EOF: a VMDESCRIPTION or the end
    DONE = "done"  # after the VMDESCRIPTION: only the end may follow
    DEVICES = "devices"  # a QEMU source's device sections after RAM, up to the VMDESCRIPTION


@dataclass
class _Section:
    idstr: str
    instance_id: int
    version_id: int
    is_open: bool


class StreamReader(RamRecords):
    """Sans-IO parser of the main migration stream (:mod:`livemig.wire.stream` for the grammar).

    ``feed(data)`` appends bytes; ``feed(b"")`` says the peer closed. ``next_event()`` returns the
    next complete :data:`~livemig.wire.events.Event` or :data:`~livemig.wire.events.NEED_DATA`.
    Each call returns at most one event (section footers are checked and consumed silently); a
    record is consumed only once it is complete, so any chunking yields the same events and errors.
    Cost: amortized O(bytes) (see :class:`~livemig.wire.buffer.ReceiveBuffer`); a Page or Blob is
    copied once out of the buffer.

    Raises :class:`~livemig.errors.WireError` for anything outside the grammar, or a close in the
    middle of a record; from then on every call raises again. ``page_size`` is the target page
    size (RAM flags live below it; LocalWireError unless a power of two >= 1024); ``max_blob``
    bounds livemig blobs. ``control_lines``: a ``{`` where a top-level record or a RAM record is
    due is a livemig control line, returned as :class:`~livemig.wire.events.ControlLine` (no
    record type starts with 0x7b, and no RAM record header: its first byte is the offset's top).


    After :meth:`expect_qemu` (a QEMU source, recognised by its machine type) the reader also
    takes configuration subsections (:class:`~livemig.wire.qemu.ConfigSubsection` events) and,
    once RAM's section ended, QEMU's device sections up to the VMDESCRIPTION, returned as one
    :class:`~livemig.wire.qemu.DeviceSections` event (:mod:`livemig.wire.qemu`).
    """

    def __init__(self, *, page_size: int = PAGE_SIZE, max_blob: int = MAX_BLOB, control_lines: bool = False) -> None:
        check_page_size(page_size)
        self.page_size = page_size
        self.max_blob = max_blob
        self.control_lines = control_lines
        self._rx = ReceiveBuffer()
        self._error: WireError | None = None
        self._state = _State.HEADER
        self._records = 0  # top-level records seen, for "CONFIGURATION must come first"
        self._config_records = -1  # records of the CONFIGURATION and its subsections
        self._sections: dict[int, _Section] = {}
        self._current: int | None = None  # section id whose payload/footer is being parsed
        self._init_ram()
        self._qemu = False  # a QEMU source's grammar (expect_qemu)
        self._devices: DeviceTail | None = None
        self._handlers: dict[_State, Callable[[], Event | None]] = {
            _State.HEADER: self._read_header,
            _State.TOP: self._read_top,
            _State.RAM: self._read_ram_records,
            _State.MEM_SIZE: self._read_ram_records,
            _State.DEVICES: self._read_devices,
            _State.BLOB: self._read_blob,
            _State.FOOTER: self._read_footer,
            _State.AFTER_EOF: self._read_after_eof,
            _State.DONE: self._read_done,
        }

    # -- public -------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed by an event."""
        return len(self._rx)

    @property
    def blocks(self) -> dict[str, int]:
        """The RAM blocks declared by MEM_SIZE so far (id -> used_length); empty before it."""
        return dict(self._blocks or {})

    def expect_qemu(self) -> None:
        """The source is QEMU: accept configuration subsections and, after RAM, device sections."""
        self._qemu = True

    def feed(self, data: Buffer) -> None:
        """Append received bytes; ``b""`` marks the end of the stream (feeding after it: LocalWireError)."""
        self._check_usable()
        if self._rx.closed:
            raise LocalWireError("StreamReader.feed() after the end of the stream was fed")
        if not len(data):
            self._rx.closed = True
            return
        self._rx.feed(data)

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
        if self._rx.closed:
            self._error = self._truncated()
            raise self._error
        return NEED_DATA

    # -- helpers ------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise WireError(f"main stream: reader unusable after an earlier error: {self._error}") from self._error

    def _truncated(self) -> WireError:
        where = f"state {self._state.value}"
        if self._current is not None:
            where += f", section {self._current} ({self._sections[self._current].idstr!r})"
        if not self._rx:
            return WireError(f"main stream: connection closed before QEMU_VM_EOF ({where})")
        return WireError(f"main stream: connection closed in the middle of a record ({where}; {len(self._rx)} bytes)")

    # -- top level ----------------------------------------------------------------------------

    def _read_header(self) -> Event | None:
        if len(self._rx) < FILE_HEADER.size:
            return None
        magic, version = self._rx.unpack(FILE_HEADER)
        if magic != QEMU_VM_FILE_MAGIC:
            raise WireError("main stream: file magic", magic, QEMU_VM_FILE_MAGIC, hex=True, note='"QEVM"')
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            obsolete = "SaveVM v2 format is obsolete and no longer supported"
            raise WireError("main stream: file version", version, QEMU_VM_FILE_VERSION, note=obsolete)
        if version != QEMU_VM_FILE_VERSION:
            raise WireError("main stream: file version", version, QEMU_VM_FILE_VERSION)
        self._rx.skip(FILE_HEADER.size)
        self._state = _State.TOP
        return Header(version)

    def _read_top(self) -> Event | None:
        if not self._rx:
            return None
        kind = self._rx.byte()
        if kind == CONTROL_LINE_START and self.control_lines:
            return self._control_line()
        if kind == QEMU_VM_CONFIGURATION:
            event: Event | None = self._read_configuration()
        elif kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            event = self._read_section_long(kind)
        elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            event = self._read_section_short(kind)
        elif kind == QEMU_VM_COMMAND:
            event = self._read_command()
        elif kind == QEMU_VM_EOF:
            self._rx.skip(1)
            self._state = _State.AFTER_EOF
            event = Eof()
        elif kind == QEMU_VM_SUBSECTION and self._qemu and self._records == self._config_records:
            event = read_config_subsection(self._rx)
            if event is not None:
                self._config_records += 1
        elif kind == QEMU_VM_SUBSECTION:
            why = "SUBSECTION outside a vmstate: configuration subsections are not supported"
            raise WireError("main stream: record type", kind, _TOP_LEVEL, hex=True, note=why)
        elif kind == QEMU_VM_SECTION_FOOTER:
            raise WireError("main stream: record type", kind, _TOP_LEVEL, hex=True, note="footer outside a section")
        else:
            raise WireError("main stream: record type", kind, _TOP_LEVEL, hex=True, note="unknown record type")
        if event is not None:
            self._records += 1
        return event

    def _control_line(self) -> Event:
        """Hand over every buffered byte as a ControlLine; nothing may follow in the stream."""
        self._state = _State.DONE
        return ControlLine(self._rx.take(len(self._rx)))

    def _read_configuration(self) -> Event | None:
        if self._records:
            raise WireError(f"main stream: CONFIGURATION (0x07) after {self._records} records, expected it first")
        if len(self._rx) < TYPE_LEN.size:
            return None
        _, length = self._rx.unpack(TYPE_LEN)
        if length > MAX_MACHINE_TYPE:
            raise WireError("main stream: machine type length", length, f"<= {MAX_MACHINE_TYPE}")
        if len(self._rx) < TYPE_LEN.size + length:
            return None
        name = ascii_text("main stream: machine type", self._rx.peek(TYPE_LEN.size, length))
        self._rx.skip(TYPE_LEN.size + length)
        self._config_records = 1  # configuration subsections may follow it (expect_qemu)
        return Configuration(name)

    def _read_section_long(self, kind: int) -> Event | None:
        fixed = SECTION_LONG.size
        if len(self._rx) < fixed:
            return None
        _, section_id, idlen = self._rx.unpack(SECTION_LONG)
        if len(self._rx) < fixed + idlen + SECTION_TAIL.size:
            return None
        idstr = ascii_text("main stream: section idstr", self._rx.peek(fixed, idlen))
        instance_id, version_id = self._rx.unpack(SECTION_TAIL, fixed + idlen)
        kind_name = "SECTION_START" if kind == QEMU_VM_SECTION_START else "SECTION_FULL"
        if idstr == RAM_SECTION_IDSTR:
            if version_id != RAM_SECTION_VERSION:
                raise WireError("main stream: section 'ram' version", version_id, RAM_SECTION_VERSION)
            if instance_id != 0:
                raise WireError("main stream: section 'ram' instance", instance_id, 0)
            payload = _State.RAM
        elif idstr.startswith(LIVEMIG_SECTION_PREFIX) and len(idstr) > len(LIVEMIG_SECTION_PREFIX):
            payload = _State.BLOB
        elif self._qemu and kind == QEMU_VM_SECTION_FULL and self._ram_ended():
            self._devices = DeviceTail()  # reads from this header on
            self._state = _State.DEVICES
            return self._read_devices()
        elif self._qemu:
            where = "before RAM's SECTION_END" if kind == QEMU_VM_SECTION_FULL else "(an iterable section)"
            what = f"main stream: {kind_name} idstr (section id {section_id}, instance {instance_id})"
            why = f"a QEMU device section {where}: its fields have no length, so it cannot be skipped"
            raise WireError(what, idstr, _SECTIONS_KNOWN, note=why)
        else:
            what = f"main stream: {kind_name} idstr (section id {section_id}, instance {instance_id})"
            raise WireError(what, idstr, _SECTIONS_KNOWN, note="unknown section: it cannot even be skipped")
        known = self._sections.get(section_id)
        if known is not None and (known.idstr, known.instance_id) != (idstr, instance_id):
            what = f"main stream: {kind_name} for section id {section_id} (idstr, instance)"
            raise WireError(what, (idstr, instance_id), (known.idstr, known.instance_id), note="the id is taken")
        if known is not None and known.is_open:
            what = f"main stream: record for section id {section_id} ({idstr!r}), which is already open"
            raise WireError(what, kind_name, "SECTION_PART or SECTION_END")
        self._rx.skip(fixed + idlen + SECTION_TAIL.size)
        self._sections[section_id] = _Section(idstr, instance_id, version_id, kind == QEMU_VM_SECTION_START)
        self._current = section_id
        self._state = payload
        self._ram_state = RamState.RAM
        if kind == QEMU_VM_SECTION_START:
            return SectionStart(section_id, idstr, instance_id, version_id)
        return SectionFull(section_id, idstr, instance_id, version_id)

    def _read_section_short(self, kind: int) -> Event | None:
        if len(self._rx) < SECTION_SHORT.size:
            return None
        _, section_id = self._rx.unpack(SECTION_SHORT)
        kind_name = "SECTION_PART" if kind == QEMU_VM_SECTION_PART else "SECTION_END"
        section = self._sections.get(section_id)
        if section is None or not section.is_open:
            open_ids = sorted(i for i, s in self._sections.items() if s.is_open)
            why = "an unknown id" if section is None else f"section {section.idstr!r} is not open"
            raise WireError(f"main stream: {kind_name} section id", section_id, f"one of {open_ids}", note=why)
        self._rx.skip(SECTION_SHORT.size)
        self._current = section_id
        self._state = _State.RAM if section.idstr == RAM_SECTION_IDSTR else _State.BLOB
        self._ram_state = RamState.RAM
        if kind == QEMU_VM_SECTION_END:
            section.is_open = False
            return SectionEnd(section_id)
        return SectionPart(section_id)

    def _read_command(self) -> Event | None:
        if len(self._rx) < COMMAND.size:
            return None
        _, cmd, length = self._rx.unpack(COMMAND)
        if cmd not in _COMMAND_LENGTHS:
            why = f"{MIG_CMD_NAMES.get(cmd, 'unknown')}: COLO and packaged streams are not supported"
            raise WireError("main stream: COMMAND", cmd, _COMMANDS_ACCEPTED, note=why)
        expected = _COMMAND_LENGTHS[cmd]
        if expected is not None and length not in expected:
            want = " or ".join(map(str, expected))
            raise WireError(f"main stream: COMMAND {cmd} ({MIG_CMD_NAMES[cmd]}) length", length, want)
        least = _DISCARD_MIN if cmd == MIG_CMD_POSTCOPY_RAM_DISCARD else 2
        if expected is None and length < least:
            raise WireError(f"main stream: COMMAND {cmd} ({MIG_CMD_NAMES[cmd]}) length", length, f">= {least}")
        if len(self._rx) < COMMAND.size + length:
            return None
        self._rx.skip(COMMAND.size)
        data = self._rx.take(length)
        if cmd == MIG_CMD_SWITCHOVER_START:
            return SwitchoverStart()
        if cmd == MIG_CMD_POSTCOPY_ADVISE:
            return PostcopyAdvise(*(BE64.unpack_from(data, 0)[0], BE64.unpack_from(data, 8)[0]) if data else (0, 0))
        if cmd == MIG_CMD_POSTCOPY_LISTEN:
            return PostcopyListen()
        if cmd == MIG_CMD_POSTCOPY_RUN:
            return PostcopyRun()
        if cmd == MIG_CMD_POSTCOPY_RAM_DISCARD:
            return _discard(data)
        if cmd == MIG_CMD_POSTCOPY_RESUME:
            return PostcopyResume()
        if cmd == MIG_CMD_RECV_BITMAP:
            if data[0] != len(data) - 1:
                raise WireError("main stream: COMMAND 10 (RECV_BITMAP) id length", data[0], len(data) - 1)
            return RecvBitmap(ascii_text("main stream: COMMAND 10 (RECV_BITMAP) RAM block id", data[1:]))
        return Command(cmd, data)

    def _read_footer(self) -> Event | None:
        if self._rx and self._rx.byte() != QEMU_VM_SECTION_FOOTER:
            what = f"main stream: record type after the payload of section {self._current}"
            raise WireError(what, self._rx.byte(), QEMU_VM_SECTION_FOOTER, hex=True, note="the section footer")
        if len(self._rx) < SECTION_SHORT.size:
            return None
        _, section_id = self._rx.unpack(SECTION_SHORT)
        if section_id != self._current:
            raise WireError("main stream: section footer id", section_id, self._current)
        self._rx.skip(SECTION_SHORT.size)
        self._current = None
        self._state = _State.TOP
        return self._read_top()

    def _read_blob(self) -> Event | None:
        if len(self._rx) < BE32.size:
            return None
        (length,) = self._rx.unpack(BE32)
        assert self._current is not None
        idstr = self._sections[self._current].idstr
        if length > self.max_blob:
            raise WireError(f"main stream: blob length in section {idstr!r}", length, f"<= {self.max_blob}")
        if len(self._rx) < BE32.size + length:
            return None
        self._rx.skip(BE32.size)
        data = self._rx.take(length)
        self._state = _State.FOOTER
        return Blob(self._current, idstr, data)

    def _read_after_eof(self) -> Event | None:
        if not self._rx:
            if self._rx.closed:
                self._state = _State.DONE
                return Closed()
            return None
        kind = self._rx.byte()
        if kind != QEMU_VM_VMDESCRIPTION:
            why = "VMDESCRIPTION or the end of the stream"
            raise WireError("main stream: record type after EOF", kind, QEMU_VM_VMDESCRIPTION, hex=True, note=why)
        if len(self._rx) < TYPE_LEN.size:
            return None
        _, length = self._rx.unpack(TYPE_LEN)
        if length > MAX_VMDESC:
            raise WireError("main stream: VMDESCRIPTION length", length, f"<= {MAX_VMDESC}")
        if len(self._rx) < TYPE_LEN.size + length:
            return None
        self._rx.skip(TYPE_LEN.size)
        raw = self._rx.take(length)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("main stream: VMDESCRIPTION", raw[:32], "UTF-8 JSON", note=str(exc)) from exc
        self._state = _State.DONE
        return VmDescription(text)

    def _read_done(self) -> Event | None:
        if self._rx:
            why = f"first byte {self._rx.byte():#04x}"
            raise WireError("main stream: bytes after the VMDESCRIPTION", len(self._rx), 0, note=why)
        if self._rx.closed:
            return Closed()
        return None

    def _ram_ended(self) -> bool:
        return any(s.idstr == RAM_SECTION_IDSTR and not s.is_open for s in self._sections.values())

    def _read_ram_records(self) -> Event | None:
        """The RAM and MEM_SIZE states: :class:`~livemig.wire.ramrecords.RamRecords` parses."""
        if (self.control_lines and self._ram_state is RamState.RAM and len(self._rx) >= BE64.size
                and self._rx.byte() == CONTROL_LINE_START):
            return self._control_line()
        handler = self._read_ram if self._ram_state is RamState.RAM else self._read_mem_size_block
        event = handler()
        self._state = {RamState.RAM: _State.RAM, RamState.MEM_SIZE: _State.MEM_SIZE,
                       RamState.FOOTER: _State.FOOTER}[self._ram_state]
        return event

    def _read_devices(self) -> Event | None:
        assert self._devices is not None
        event = self._devices.take(self._rx)
        if event is not None:
            self._current = None
            self._state = _State.DONE
        return event
