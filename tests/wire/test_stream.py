"""Main stream: writers' golden bytes, the StreamReader under every chunking, and every rejection."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterable

import pytest

from livemig.errors import LocalWireError, WireError
from livemig.wire.stream import (
    NEED_DATA,
    Blob,
    Closed,
    Command,
    Configuration,
    Eof,
    Eos,
    Event,
    Header,
    MemSize,
    MultifdFlush,
    Page,
    SectionEnd,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamReader,
    SwitchoverStart,
    VmDescription,
    ZeroPage,
    blob,
    command,
    configuration,
    eof,
    file_header,
    open_return_path,
    ping,
    ram_eos,
    ram_mem_size,
    ram_multifd_flush,
    ram_page,
    ram_zero_page,
    section_end,
    section_footer,
    section_full,
    section_part,
    section_start,
    switchover_start,
    vm_description,
)

PAGE = 4096
BLOCKS = [("pc.ram", 64 * PAGE), ("vga.vram", 4 * PAGE)]


# --- golden bytes ----------------------------------------------------------------------------

# Hand-assembled from docs/wire.md, "Main stream".
GOLDEN = bytes.fromhex(
    "5145564d" "00000003"  # QEVM, version 3
    "07" "00000002" "7063"  # CONFIGURATION "pc"
    "01" "00000001" "03" "72616d" "00000000" "00000004"  # SECTION_START 1 "ram" instance 0 version 4
    "0000000000002004" "06" "70632e72616d" "0000000000002000"  # MEM_SIZE 0x2000: "pc.ram" 0x2000
    "0000000000000200"  # MULTIFD_FLUSH
    "0000000000000010"  # EOS
    "7e" "00000001"  # footer 1
    "02" "00000001"  # SECTION_PART 1
    "0000000000001002" "06" "70632e72616d" "00"  # ZERO pc.ram @0x1000, fill 0
    "0000000000000022" "00"  # ZERO|CONTINUE @0, fill 0
    "0000000000000010"  # EOS
    "7e" "00000001"  # footer 1
    "08" "000b" "0000"  # COMMAND SWITCHOVER_START
    "04" "00000002" "09" "6c6976656d69672f78" "00000000" "00000001"  # SECTION_FULL 2 "livemig/x" 0 1
    "00000002" "6869"  # blob "hi"
    "7e" "00000002"  # footer 2
    "00"  # EOF
    "06" "00000002" "7b7d"  # VMDESCRIPTION "{}"
)
GOLDEN_EVENTS: list[Event] = [
    Header(3),
    Configuration("pc"),
    SectionStart(1, "ram", 0, 4),
    MemSize([("pc.ram", 0x2000)]),
    MultifdFlush(),
    Eos(),
    SectionPart(1),
    ZeroPage("pc.ram", 0x1000),
    ZeroPage("pc.ram", 0),
    Eos(),
    SwitchoverStart(),
    SectionFull(2, "livemig/x", 0, 1),
    Blob(2, "livemig/x", b"hi"),
    Eof(),
    VmDescription("{}"),
]


def test_writers_golden() -> None:
    written = (
        file_header()
        + configuration("pc")
        + section_start(1, "ram", 0, 4)
        + ram_mem_size([("pc.ram", 0x2000)])
        + ram_multifd_flush()
        + ram_eos()
        + section_footer(1)
        + section_part(1)
        + ram_zero_page("pc.ram", 0x1000)
        + ram_zero_page(None, 0)
        + ram_eos()
        + section_footer(1)
        + switchover_start()
        + section_full(2, "livemig/x", 0, 1)
        + blob(b"hi")
        + section_footer(2)
        + eof()
        + vm_description("{}")
    )
    assert written == GOLDEN


def test_small_writers_golden() -> None:
    assert section_end(5) == bytes.fromhex("0300000005")
    assert ram_page("b", 0x3000, b"\x01" * PAGE) == bytes.fromhex("0000000000003008" "01" "62") + b"\x01" * PAGE
    assert ram_page(None, 0x3000, b"\x01" * PAGE)[:8] == bytes.fromhex("0000000000003028")
    assert open_return_path() == bytes.fromhex("0800010000")
    assert ping(1) == bytes.fromhex("080002000400000001")
    assert command(11) == switchover_start()


# --- the reader under every chunking ---------------------------------------------------------


def _drain(reader: StreamReader) -> list[Event]:
    out: list[Event] = []
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            return out
        out.append(event)
        if isinstance(event, Closed):
            return out


def _read(chunks: Iterable[bytes], close: bool = True) -> list[Event]:
    reader = StreamReader()
    events: list[Event] = []
    for chunk in chunks:
        reader.feed(chunk)
        events += _drain(reader)
    if close:
        reader.feed(b"")
        events += _drain(reader)
    return events


def _one_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def _random_chunks(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(1, 300)
        out.append(data[pos : pos + n])
        pos += n
    return out


def _full_stream() -> tuple[bytes, list[Event]]:
    """A stream touching every event type, with pages, CONTINUE, commands and two livemig sections."""
    page_a = bytes(range(256)) * 16
    page_b = b"\xab" * PAGE
    parts: list[tuple[bytes, Event | None]] = [
        (file_header(), Header(3)),
        (configuration("pc-q35-10.2"), Configuration("pc-q35-10.2")),
        (open_return_path(), Command(1, b"")),
        (ping(1), Command(2, b"\x00\x00\x00\x01")),
        (section_start(3, "ram", 0, 4), SectionStart(3, "ram", 0, 4)),
        (ram_mem_size(BLOCKS), MemSize(BLOCKS)),
        (ram_multifd_flush(), MultifdFlush()),
        (ram_eos(), Eos()),
        (section_footer(3), None),
        (section_start(4, "livemig/dirty", 0, 1), SectionStart(4, "livemig/dirty", 0, 1)),
        (blob(b"setup"), Blob(4, "livemig/dirty", b"setup")),
        (section_footer(4), None),
        (section_part(3), SectionPart(3)),
        (ram_page("pc.ram", 5 * PAGE, page_a), Page("pc.ram", 5 * PAGE, page_a)),
        (ram_page(None, 63 * PAGE, page_b), Page("pc.ram", 63 * PAGE, page_b)),
        (ram_zero_page("vga.vram", 3 * PAGE), ZeroPage("vga.vram", 3 * PAGE)),
        (ram_zero_page(None, 0), ZeroPage("vga.vram", 0)),
        (ram_multifd_flush(), MultifdFlush()),
        (ram_eos(), Eos()),
        (section_footer(3), None),
        (section_part(4), SectionPart(4)),
        (blob(b""), Blob(4, "livemig/dirty", b"")),
        (section_footer(4), None),
        (switchover_start(), SwitchoverStart()),
        (section_end(3), SectionEnd(3)),
        (ram_zero_page(None, PAGE), ZeroPage("vga.vram", PAGE)),
        (ram_multifd_flush(), MultifdFlush()),
        (ram_eos(), Eos()),
        (section_footer(3), None),
        (section_end(4), SectionEnd(4)),
        (blob(b"\x00" * 1000), Blob(4, "livemig/dirty", b"\x00" * 1000)),
        (section_footer(4), None),
        (section_full(5, "livemig/cpu", 0, 2), SectionFull(5, "livemig/cpu", 0, 2)),
        (blob(b"regs"), Blob(5, "livemig/cpu", b"regs")),
        (section_footer(5), None),
        (eof(), Eof()),
        (vm_description(json.dumps({"page_size": PAGE})), VmDescription('{"page_size": 4096}')),
    ]
    data = b"".join(raw for raw, _ in parts)
    events = [event for _, event in parts if event is not None] + [Closed()]
    return data, events


STREAMS = {"golden": (GOLDEN, [*GOLDEN_EVENTS, Closed()]), "full": _full_stream()}


@pytest.mark.parametrize("name", STREAMS)
def test_whole_buffer(name: str) -> None:
    data, expected = STREAMS[name]
    assert _read([data]) == expected


@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_at_a_time(name: str) -> None:
    data, expected = STREAMS[name]
    assert _read(_one_byte(data)) == expected


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks(seed: int) -> None:
    data, expected = STREAMS["full"]
    assert _read(_random_chunks(data, seed)) == expected


@pytest.mark.parametrize("chunk", [bytes, bytearray, memoryview])
def test_feed_accepts_buffers(chunk: type) -> None:
    data, expected = STREAMS["full"]
    assert _read([chunk(data[:100]), chunk(data[100:])]) == expected


@pytest.mark.parametrize("cut", range(1, len(GOLDEN)))
def test_every_prefix_then_rest(cut: int) -> None:
    """h11's trailing-bytes check: a prefix yields the events fully inside it, the rest stays buffered."""
    reader = StreamReader()
    reader.feed(GOLDEN[:cut])
    first = _drain(reader)
    assert first == GOLDEN_EVENTS[: len(first)]
    reader.feed(GOLDEN[cut:])
    assert first + _drain(reader) == GOLDEN_EVENTS
    assert reader.buffered == 0


def test_trailing_partial_record_stays_buffered() -> None:
    head = file_header() + section_start(1, "ram", 0, 4)
    partial = ram_mem_size(BLOCKS)[:11]
    reader = StreamReader()
    reader.feed(head + partial)
    assert _drain(reader) == [Header(3), SectionStart(1, "ram", 0, 4)]
    assert reader.buffered == 3  # the MEM_SIZE word (8) was consumed, the first block entry was not


def test_closed_after_eof_without_vmdescription() -> None:
    data = file_header() + eof()
    assert _read([data]) == [Header(3), Eof(), Closed()]
    assert _read([data], close=False) == [Header(3), Eof()]


def test_closed_repeats_and_feed_after_close_refused() -> None:
    reader = StreamReader()
    reader.feed(file_header() + eof())
    reader.feed(b"")
    assert _drain(reader) == [Header(3), Eof(), Closed()]
    assert reader.next_event() == Closed()
    with pytest.raises(LocalWireError, match="after the end of the stream"):
        reader.feed(b"x")


def test_mem_size_with_no_blocks_and_blocks_property() -> None:
    data = file_header() + section_start(1, "ram", 0, 4) + ram_mem_size([])
    reader = StreamReader()
    reader.feed(data)
    assert _drain(reader)[-1] == MemSize([])
    assert reader.blocks == {}
    reader2 = StreamReader()
    reader2.feed(file_header() + section_start(1, "ram", 0, 4) + ram_mem_size(BLOCKS))
    _drain(reader2)
    assert reader2.blocks == dict(BLOCKS)


def test_many_records_buffer_stays_bounded() -> None:
    """Large feeds: the buffer is compacted, so memory tracks what is unconsumed, not what was fed."""
    page = b"\x11" * PAGE
    body = b"".join(ram_page(None, (i % 64) * PAGE, page) for i in range(2000))
    data = (
        file_header() + section_start(1, "ram", 0, 4) + ram_mem_size(BLOCKS) + ram_zero_page("pc.ram", 0)
        + body + ram_eos() + section_footer(1) + eof()
    )
    reader = StreamReader()
    pages = 0
    peak = 0
    for pos in range(0, len(data), 65536):
        reader.feed(data[pos : pos + 65536])
        peak = max(peak, reader._rx.allocated)  # white-box: the compaction is the point of this test
        pages += sum(isinstance(e, Page) for e in _drain(reader))
    assert pages == 2000
    assert peak <= 3 * 65536


# --- rejections ------------------------------------------------------------------------------

RAM_HEAD = file_header() + section_start(1, "ram", 0, 4) + ram_mem_size(BLOCKS)


def _reject(data: bytes, match: str, *, close: bool = False, **kwargs: int) -> WireError:
    """Feeding ``data`` whole and one byte at a time both fail with ``match``; the reader then stays failed."""
    for chunks in ([data], _one_byte(data)):
        reader = StreamReader(**kwargs)
        with pytest.raises(WireError, match=match) as info:
            for chunk in chunks:
                reader.feed(chunk)
                _drain(reader)
            if close:
                reader.feed(b"")
                _drain(reader)
        with pytest.raises(WireError, match="unusable after an earlier error"):
            reader.next_event()
        with pytest.raises(WireError, match="unusable after an earlier error"):
            reader.feed(b"more")
    return info.value


def test_bad_magic() -> None:
    err = _reject(b"QEVN" + bytes(4), r'^main stream: file magic: received 0x5145564e, expected 0x5145564d \("QEVM"\)$')
    assert err.value == 0x5145564E and err.expected == 0x5145564D


def test_obsolete_v2() -> None:
    _reject(struct.pack(">II", 0x5145564D, 2), "SaveVM v2 format is obsolete and no longer supported")


def test_unknown_version() -> None:
    _reject(struct.pack(">II", 0x5145564D, 4), "file version: received 4, expected 3")


@pytest.mark.parametrize("kind", [0x09, 0x10, 0x7F, 0xFF])
def test_unknown_record_type(kind: int) -> None:
    _reject(file_header() + bytes([kind]), rf"record type: received {kind:#x}, .*\(unknown record type\)")


def test_subsection_and_stray_footer_at_top_level() -> None:
    _reject(file_header() + configuration("pc") + b"\x05", "SUBSECTION")
    _reject(file_header() + section_footer(1), r"received 0x7e, .*\(footer outside a section\)")


def test_configuration_must_come_first() -> None:
    _reject(file_header() + open_return_path() + configuration("pc"), "CONFIGURATION .* after 1 records, expected it")


def test_configuration_too_long() -> None:
    _reject(file_header() + b"\x07" + struct.pack(">I", 100000), "type length: received 100000, expected <= 256")


@pytest.mark.parametrize("idstr", ["block", "dirty-bitmap", "livemig", "livemig/", "RAM", "cpu"])
def test_unknown_section(idstr: str) -> None:
    _reject(file_header() + section_start(1, idstr, 0, 1), f"START idstr .*: received '{idstr}'.*unknown section")
    _reject(file_header() + section_full(1, idstr, 0, 1), "SECTION_FULL idstr .*unknown section")


def test_ram_section_version_and_instance() -> None:
    _reject(file_header() + section_start(1, "ram", 0, 3), "section 'ram' version: received 3, expected 4")
    _reject(file_header() + section_start(1, "ram", 1, 4), "section 'ram' instance: received 1, expected 0")


def test_footer_mismatch_names_both() -> None:
    err = _reject(RAM_HEAD + ram_eos() + section_footer(2), "section footer id: received 2, expected 1")
    assert (err.value, err.expected) == (2, 1)


def test_missing_footer() -> None:
    _reject(RAM_HEAD + ram_eos() + section_part(1), "after the payload of section 1: received 0x2, expected 0x7e")
    _reject(RAM_HEAD + ram_eos() + eof(), r"payload of section 1: received 0x0, expected 0x7e \(the section footer")


def test_part_of_unknown_or_closed_section() -> None:
    _reject(file_header() + section_part(9), r"PART section id: received 9, expected one of \[\] \(an unknown id\)")
    ended = RAM_HEAD + ram_eos() + section_footer(1) + section_end(1) + ram_eos() + section_footer(1)
    _reject(ended + section_part(1), r"SECTION_PART section id: received 1, .*\(section 'ram' is not open\)")
    full = file_header() + section_full(2, "livemig/cpu", 0, 1) + blob(b"") + section_footer(2)
    _reject(full + section_end(2), "SECTION_END section id: received 2, .*not open")


def test_section_id_reuse() -> None:
    opened = RAM_HEAD + ram_eos() + section_footer(1)
    _reject(opened + section_start(1, "ram", 0, 4), "section id 1 .* already open")
    taken = r"section id 1 .*: received \('livemig/x', 0\), expected \('ram', 0\) \(the id is taken\)"
    _reject(opened + section_start(1, "livemig/x", 0, 1), taken)


def test_continue_before_any_block() -> None:
    _reject(RAM_HEAD + ram_zero_page(None, 0), r"CONTINUE \(0x20\) at offset 0x0, expected a block id first")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (0x40, "XBZRLE"),
        (0x48, "XBZRLE"),
        (0x80, "HOOK"),
        (0x100, "COMPRESS_PAGE"),
        (0x01, "FULL"),
        (0x400, "received 0x400, .*Unknown combination of migration flags"),
        (0x800, "received 0x800, .*Unknown combination of migration flags"),
        (0x0A, "received 0xa, .*Unknown combination of migration flags"),  # ZERO|PAGE
        (0x00, "received 0x0, .*Unknown combination of migration flags"),
        (0x30, r"received 0x30, .*\(ZERO, PAGE \+CONTINUE 0x20\)"),  # EOS|CONTINUE
        (0x220, r"received 0x220, .*\(ZERO, PAGE \+CONTINUE 0x20\)"),
    ],
)
def test_bad_ram_flags(flags: int, match: str) -> None:
    _reject(RAM_HEAD + struct.pack(">Q", 0x1000 | flags), match)


def test_block_not_declared() -> None:
    _reject(RAM_HEAD + ram_zero_page("pc.rom", 0), "block id: received 'pc.rom', .*Unknown ramblock")
    no_mem_size = file_header() + section_start(1, "ram", 0, 4)
    _reject(no_mem_size + ram_zero_page("pc.ram", 0), "block id: received 'pc.ram', .*Unknown ramblock")


def test_offset_outside_block() -> None:
    last = 63 * PAGE
    reader = StreamReader()
    reader.feed(RAM_HEAD + ram_zero_page("pc.ram", last))
    assert _drain(reader)[-1] == ZeroPage("pc.ram", last)
    too_far = "offset in block 'pc.ram' of 0x40000 bytes: received 0x40000, expected <= 0x3f000"
    _reject(RAM_HEAD + ram_zero_page("pc.ram", 64 * PAGE), too_far)
    _reject(RAM_HEAD + ram_page("vga.vram", 4 * PAGE, bytes(PAGE)), "offset in block 'vga.vram'")
    _reject(RAM_HEAD + ram_zero_page("pc.ram", 2**63), "offset in block 'pc.ram'.*received 0x8000000000000000")


def test_zero_page_fill_byte() -> None:
    raw = RAM_HEAD + ram_zero_page("pc.ram", 0)[:-1] + b"\x07"
    _reject(raw, "zero page fill byte at offset 0x0 of block 'pc.ram': received 7, expected 0")


def test_eos_and_flush_with_address() -> None:
    _reject(RAM_HEAD + struct.pack(">Q", 0x1000 | 0x10), "EOS record address: received 0x1000, expected 0x0")
    _reject(RAM_HEAD + struct.pack(">Q", 0x2000 | 0x200), "MULTIFD_FLUSH record address: received 0x2000")


def test_mem_size_errors() -> None:
    head = file_header() + section_start(1, "ram", 0, 4)
    _reject(head + ram_mem_size(BLOCKS) + ram_mem_size(BLOCKS), "second MEM_SIZE")
    entry = b"\x01a" + struct.pack(">Q", 2 * PAGE)
    _reject(head + struct.pack(">Q", PAGE | 0x04) + entry, "length of block 'a': received 8192, expected <= 4096")
    _reject(head + struct.pack(">Q", PAGE | 0x04) + b"\x00", "MEM_SIZE block id length: received 0, expected 1..255")
    twice = struct.pack(">Q", 2 * PAGE | 0x04) + (b"\x01a" + struct.pack(">Q", PAGE)) * 2
    _reject(head + twice, r"MEM_SIZE block id: received 'a', expected each block once \(listed twice\)")


def test_blob_too_big() -> None:
    data = file_header() + section_full(2, "livemig/cpu", 0, 1) + blob(b"x" * 100)
    _reject(data, "blob length in section 'livemig/cpu': received 100, expected <= 64", max_blob=64)
    reader = StreamReader(max_blob=100)
    reader.feed(data)
    assert _drain(reader)[-1] == Blob(2, "livemig/cpu", b"x" * 100)


@pytest.mark.parametrize(
    ("cmd", "name"), [(7, "PACKAGED"), (8, "ENABLE_COLO"), (99, "unknown")]
)
def test_unsupported_commands(cmd: int, name: str) -> None:
    _reject(file_header() + command(cmd), rf"COMMAND: received {cmd}, .*\({name}: COLO")


def test_command_wrong_length() -> None:
    _reject(file_header() + command(11, b"\x00"), r"COMMAND 11 \(SWITCHOVER_START\) length: received 1, expected 0")
    _reject(file_header() + command(2, b"\x00\x00"), r"COMMAND 2 \(PING\) length: received 2, expected 4")


def test_bytes_after_eof_and_vmdescription() -> None:
    _reject(file_header() + eof() + b"\x01", "record type after EOF: received 0x1, expected 0x6")
    _reject(file_header() + eof() + vm_description("{}") + b"\x00", "after the VMDESCRIPTION")
    not_utf8 = file_header() + eof() + b"\x06" + struct.pack(">I", 2) + b"\xff\xfe"
    _reject(not_utf8, r"VMDESCRIPTION: received b'\\xff\\xfe', expected UTF-8 JSON")


def test_closed_mid_record_or_before_eof() -> None:
    _reject(RAM_HEAD + ram_page("pc.ram", 0, bytes(PAGE))[:-1], "closed in the middle of a record", close=True)
    _reject(file_header()[:5], "closed in the middle of a record", close=True)
    _reject(RAM_HEAD + ram_eos() + section_footer(1), "closed before QEMU_VM_EOF", close=True)


# --- writer argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: ram_page("pc.ram", 0, b"short"),
        lambda: ram_page("pc.ram", 100, bytes(PAGE)),
        lambda: ram_zero_page("pc.ram", -PAGE),
        lambda: ram_zero_page("", 0),
        lambda: ram_zero_page("x" * 256, 0),
        lambda: ram_mem_size([("a", 100)]),
        lambda: ram_mem_size([("a", PAGE), ("a", PAGE)]),
        lambda: ram_mem_size([("", PAGE)]),
        lambda: section_start(1, "x" * 256, 0, 1),
        lambda: section_full(1, "", 0, 1),
        lambda: section_start(1, "rämm", 0, 1),
        lambda: configuration("pc-ä"),
        lambda: blob(b"x" * 10, max_len=9),
        lambda: command(2, bytes(70000)),
        lambda: StreamReader(page_size=3000),
        lambda: StreamReader(page_size=512),
    ],
)
def test_writer_argument_errors(call: object) -> None:
    with pytest.raises(LocalWireError):
        call()  # type: ignore[operator]
