"""The main migration stream: one namespace for its writers, its events and its sans-IO reader.

What livemig puts on the main channel, in QEMU's byte format (``migration/savevm.c``, ``ram.c``;
the record layouts are in docs/wire.md, "Main stream")::

    file_header()                       "QEVM", version 3
    configuration(machine_type)         0x07, be32 len, name; no subsections
    [command(...)]                      0x08, be16 cmd, be16 len, data
    section_start(id, "ram", 0, 4)      0x01 ... then RAM records:
        ram_mem_size(blocks)            be64 total|0x04, {u8 len, id, be64 used_length}*
        ram_multifd_flush()             be64 0x200   (per-round "modern" multifd sync marker)
        ram_eos()                       be64 0x10
    section_footer(id)                  0x7e, be32 id (section footers are always on)
    section_start/full(id, "livemig/...", 0, v), blob(data), section_footer(id)
    section_part(id) / section_end(id)  0x02 / 0x03, be32 id, payload, footer
    [command SWITCHOVER_START]          before the final SECTION_ENDs (10.0+)
    post-copy (capability postcopy-ram; docs/postcopy.md):
    postcopy_advise(summary, tps)       after livemig/config: COMMAND 3, be64 x2
    postcopy_ram_discard(block, ranges) at the switch, per block: COMMAND 6 (as many as needed)
    postcopy_listen(), livemig/vcpu, postcopy_run()   COMMAND 4, the state, COMMAND 5
    section_part(ram) pages, EOS ...    the discarded pages, on the main channel
    eof()                               0x00
    [vm_description(json)]              0x06, be32 len, JSON

The payload of a section is RAM records for the section whose idstr is "ram" (version 4,
instance 0), and exactly one :func:`blob` (be32 length + bytes) for livemig's own sections, whose
idstr starts with "livemig/". Any other section is refused: without a vmstate description its
payload cannot even be skipped; except, from a QEMU source (:meth:`StreamReader.expect_qemu`),
the device sections after RAM, read whole up to the VMDESCRIPTION that describes them
(:mod:`livemig.wire.qemu`).

The code lives in small modules, as h11 splits its protocol; this one re-exports their public
names so callers write ``stream.section_full(...)``, ``stream.StreamReader()``, ``stream.Blob``:

* :mod:`livemig.wire.writers`: pure functions returning the ``bytes`` of one record; arguments the
  format cannot carry raise :class:`~livemig.errors.LocalWireError`.
* :mod:`livemig.wire.events`: the frozen dataclasses the reader returns, and :data:`NEED_DATA`.
* :mod:`livemig.wire.reader`: :class:`StreamReader`, h11-shaped: ``feed()`` bytes as they arrive
  (``feed(b"")`` = the peer closed), then call ``next_event()`` until it returns :data:`NEED_DATA`.
  Bad input raises :class:`~livemig.errors.WireError` naming the field, the value received and the
  value expected; after that the reader refuses further use.
* :mod:`livemig.wire.ramrecords`: the RAM section's records, parsed for the reader.
* :mod:`livemig.wire.buffer`: the reader's receive buffer.
* :mod:`livemig.wire.layout`: the records' ``struct`` layouts and the reader's size limits.
"""

from __future__ import annotations

from livemig.wire.events import (
    NEED_DATA,
    Blob,
    Closed,
    Command,
    ConfigSubsection,
    Configuration,
    ControlLine,
    DeviceSection,
    DeviceSections,
    Eof,
    Eos,
    Event,
    Header,
    MemSize,
    MultifdFlush,
    NeedData,
    Page,
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
    ZeroPage,
)
from livemig.wire.layout import MAX_BLOB, MAX_MACHINE_TYPE, MAX_RAM_BLOCKS, MAX_VMDESC
from livemig.wire.reader import StreamReader
from livemig.wire.writers import (
    blob,
    command,
    configuration,
    eof,
    file_header,
    open_return_path,
    ping,
    postcopy_advise,
    postcopy_listen,
    postcopy_ram_discard,
    postcopy_resume,
    postcopy_run,
    ram_eos,
    ram_mem_size,
    ram_multifd_flush,
    ram_page,
    ram_zero_page,
    recv_bitmap,
    section_end,
    section_footer,
    section_full,
    section_part,
    section_start,
    switchover_start,
    vm_description,
)

__all__ = [
    "MAX_BLOB",
    "MAX_MACHINE_TYPE",
    "MAX_RAM_BLOCKS",
    "MAX_VMDESC",
    "NEED_DATA",
    "Blob",
    "Closed",
    "Command",
    "Configuration",
    "ControlLine",
    "ConfigSubsection",
    "DeviceSection",
    "DeviceSections",
    "Eof",
    "Eos",
    "Event",
    "Header",
    "MemSize",
    "MultifdFlush",
    "NeedData",
    "Page",
    "PostcopyAdvise",
    "PostcopyDiscard",
    "PostcopyListen",
    "PostcopyResume",
    "PostcopyRun",
    "RecvBitmap",
    "SectionEnd",
    "SectionFull",
    "SectionPart",
    "SectionStart",
    "SwitchoverStart",
    "VmDescription",
    "ZeroPage",
    "StreamReader",
    "blob",
    "command",
    "configuration",
    "eof",
    "file_header",
    "open_return_path",
    "ping",
    "postcopy_advise",
    "postcopy_listen",
    "postcopy_ram_discard",
    "postcopy_resume",
    "postcopy_run",
    "ram_eos",
    "ram_mem_size",
    "recv_bitmap",
    "ram_multifd_flush",
    "ram_page",
    "ram_zero_page",
    "section_end",
    "section_footer",
    "section_full",
    "section_part",
    "section_start",
    "switchover_start",
    "vm_description",
]
