"""A QEMU source's main stream through the StreamReader: configuration subsections, the device
sections after RAM read whole up to the VMDESCRIPTION, and what stays refused."""

from __future__ import annotations

import pytest

from livemig.errors import WireError
from livemig.wire.qemu import rp_pong, rp_shut
from livemig.wire.stream import (
    NEED_DATA,
    Closed,
    ConfigSubsection,
    DeviceSection,
    DeviceSections,
    Event,
    StreamReader,
    eof,
    section_full,
    section_start,
)
from support.qemu_bytes import DEVICES, config_part, description, device_part, device_sections, ram_end, ram_setup


def events(data: bytes, chunk: int, qemu: bool = True, close: bool = False) -> list[Event]:
    reader = StreamReader()
    if qemu:
        reader.expect_qemu()
    out: list[Event] = []
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] + ([b""] if close else [])
    for piece in pieces:
        reader.feed(piece)
        while (ev := reader.next_event()) is not NEED_DATA:
            out.append(ev)
            if isinstance(ev, Closed):
                return out
    return out


def whole(modern: bool = False, described: bool = True) -> bytes:
    return config_part() + ram_setup(modern) + ram_end(modern) + device_part(described)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("modern", [False, True])
def test_device_sections_are_walked_by_the_vmdescription(chunk: int, modern: bool) -> None:
    got = events(whole(modern), chunk)
    last = got[-1]
    assert isinstance(last, DeviceSections)
    sizes = [len(section_full(i, n, inst, v)) + len(p) + 5 for i, n, inst, v, p in DEVICES]
    assert last.sections == [DeviceSection(i, n, inst, v, size)
                             for (i, n, inst, v, _), size in zip(DEVICES, sizes, strict=True)]
    assert last.size == len(device_sections()) and last.description == description()


def test_without_a_vmdescription_the_part_ends_where_the_source_closes() -> None:
    got = events(whole(described=False), 4096, close=True)
    assert got[-2] == DeviceSections([], len(device_sections()), None)
    with pytest.raises(WireError, match="connection closed in the device sections after RAM"):
        events(whole(described=False)[:-1], 4096, close=True)


def test_a_vmdescription_that_does_not_walk_the_sections_is_not_the_end() -> None:
    wrong = description().replace('"cpu"', '"cpx"')
    data = config_part() + ram_setup(False) + ram_end(False) + device_sections() + eof()
    from livemig.wire.stream import vm_description

    with pytest.raises(WireError, match="closed in the device sections"):
        events(data + vm_description(wrong), 4096, close=True)


def test_configuration_capabilities_subsection() -> None:
    got = events(config_part(capabilities=["x-ignore-shared"]) + ram_setup(False), 3)
    assert got[2] == ConfigSubsection("configuration/capabilities", 1, ["x-ignore-shared"])


def test_an_unknown_configuration_subsection_is_refused() -> None:
    name = b"configuration/other"
    data = config_part() + bytes([5, len(name)]) + name + b"\0\0\0\1"
    with pytest.raises(WireError, match="configuration/other.*cannot be skipped"):
        events(data, 4096)
    with pytest.raises(WireError, match="SUBSECTION"):  # livemig's own grammar has none
        events(config_part(capabilities=[]), 4096, qemu=False)


def test_device_sections_are_refused_before_ram_ends_and_from_livemig() -> None:
    early = config_part() + section_full(3, "virtio-mem", 0, 1)
    with pytest.raises(WireError, match="before RAM's SECTION_END: its fields have no length"):
        events(early, 4096)
    with pytest.raises(WireError, match="an iterable section"):
        events(config_part() + ram_setup(False) + section_start(3, "dirty-bitmap", 0, 1), 4096)
    with pytest.raises(WireError, match="unknown section: it cannot even be skipped"):
        events(whole(), 4096, qemu=False)


def test_return_path_messages() -> None:
    assert rp_shut(False) == bytes.fromhex("0001 0004 00000000")
    assert rp_shut(True) == bytes.fromhex("0001 0004 00000001")
    assert rp_pong(1) == bytes.fromhex("0002 0004 00000001")
