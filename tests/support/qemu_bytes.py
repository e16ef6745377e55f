"""Byte-level QEMU source streams for the tests (no QEMU needed): what QEMU 7.2 and 10.x put on the
main channel around RAM, and their device part (SECTION_FULLs with no length, EOF, VMDESCRIPTION)."""

from __future__ import annotations

import json
import struct

from livemig.wire.stream import (
    configuration,
    eof,
    file_header,
    ram_eos,
    ram_mem_size,
    ram_multifd_flush,
    section_end,
    section_footer,
    section_full,
    section_start,
    switchover_start,
    vm_description,
)

PAGE = 4096
BLOCKS = [("pc.ram", 16 * PAGE), ("/rom@etc/acpi/tables", 2 * PAGE)]
#: (section id, idstr, instance, version, payload): the "timer" payload holds what looks like its own
#: footer followed by a SECTION_FULL byte, so only the VMDESCRIPTION's device list finds the real end
DEVICES = [
    (3, "timer", 0, 2, b"\x00" * 8 + b"\x7e\x00\x00\x00\x03\x04" + b"\x11" * 9),
    (4, "cpu", 0, 17, bytes(range(200))),
    (5, "globalstate", 0, 1, struct.pack(">I", 8) + b"running\x00"),
]


def config_part(machine: str = "pc-q35-7.2", capabilities: list[str] | None = None) -> bytes:
    out = file_header() + configuration(machine)
    if capabilities is not None:
        name = b"configuration/capabilities"
        out += bytes([5, len(name)]) + name + struct.pack(">II", 1, len(capabilities))
        out += b"".join(bytes([len(c)]) + c.encode() for c in capabilities)
    return out


def ram_setup(modern: bool) -> bytes:
    """START ram with MEM_SIZE; 10.x puts a MULTIFD_FLUSH before the EOS, 7.2 does not."""
    return (section_start(2, "ram", 0, 4) + ram_mem_size(BLOCKS) + (ram_multifd_flush() if modern else b"")
            + ram_eos() + section_footer(2))


def ram_end(modern: bool, records: bytes = b"") -> bytes:
    return ((switchover_start() if modern else b"") + section_end(2) + records
            + (ram_multifd_flush() if modern else b"") + ram_eos() + section_footer(2))


def device_sections() -> bytes:
    return b"".join(section_full(i, name, inst, ver) + payload + section_footer(i)
                    for i, name, inst, ver, payload in DEVICES)


def description() -> str:
    return json.dumps({"page_size": PAGE, "devices": [
        {"name": name, "instance_id": inst, "vmsd_name": name, "version": ver, "fields": []}
        for _, name, inst, ver, _ in DEVICES]})


def device_part(described: bool = True) -> bytes:
    return device_sections() + eof() + (vm_description(description()) if described else b"")
