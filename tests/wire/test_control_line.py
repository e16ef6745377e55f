"""The source's Abort before the stream's end: a livemig control line where a record is due.

With ``control_lines=True`` the reader hands over every byte from a ``{`` that stands where a
top-level record or a RAM record is due, as one ControlLine, whatever the chunking; without it the
same byte is the unknown record type it is in QEMU's format.
"""

from __future__ import annotations

import pytest

from livemig.errors import WireError
from livemig.migration import protocol
from livemig.wire import stream

ABORT = protocol.encode(protocol.Abort("migration cancelled"))
HEAD = stream.file_header() + stream.configuration("livemig-1")
RAM = stream.section_start(2, "ram", 0, 4) + stream.ram_mem_size([("pc.ram", 1 << 20)])
FLUSH = stream.ram_multifd_flush()


def _events(data: bytes, chunk: int, control_lines: bool = True) -> list[object]:
    reader = stream.StreamReader(control_lines=control_lines)
    out: list[object] = []
    for i in range(0, len(data), chunk):
        reader.feed(data[i:i + chunk])
        while (ev := reader.next_event()) is not stream.NEED_DATA:
            out.append(ev)
            if isinstance(ev, stream.ControlLine):
                return out
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize(("before", "where"), [
    (HEAD, "top level"),
    (HEAD + RAM, "RAM section, after MEM_SIZE"),
    (HEAD + RAM + FLUSH, "RAM section, after MULTIFD_FLUSH"),
], ids=["top", "after-mem-size", "after-flush"])
def test_a_control_line_where_a_record_is_due(before: bytes, where: str, chunk: int) -> None:
    events = _events(before + ABORT, chunk)
    line = events[-1]
    assert isinstance(line, stream.ControlLine), where
    # every byte buffered from the "{" on: the rest of the line, if any, is the caller's to read
    assert line.data and ABORT.startswith(line.data)
    rest = ABORT[len(line.data):]
    assert protocol.decode(line.data + rest, "to-destination") == protocol.Abort("migration cancelled")


def test_without_control_lines_the_brace_is_an_unknown_record_type() -> None:
    with pytest.raises(WireError, match="record type.*0x7b"):
        _events(HEAD + ABORT, 4096, control_lines=False)


def test_a_brace_inside_a_page_is_data() -> None:
    page = b"{" * 4096
    events = _events(HEAD + RAM + stream.ram_page("pc.ram", 0, page) + ABORT, 4096)
    assert isinstance(events[-2], stream.Page) and bytes(events[-2].data) == page
    assert isinstance(events[-1], stream.ControlLine)
