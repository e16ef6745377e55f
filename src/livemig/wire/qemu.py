"""What a QEMU source puts on the main stream beyond livemig's own grammar (sans-IO).

* Configuration subsections (``0x05, u8 namelen, name, be32 version, fields``) right after the
  CONFIGURATION record: ``configuration/capabilities`` (be32 count, then u8 len + name each),
  ``configuration/target-page-bits`` (be32), ``configuration/uuid`` (16 bytes). There is no
  terminator: the next record is not 0x05. Any other subsection cannot be skipped (its fields have
  no length) and is refused.
* The device part: after RAM's SECTION_END come the non-iterable devices, each a SECTION_FULL whose
  vmstate fields follow back to back with **no length prefix**, closed by its footer (0x7e + id);
  then QEMU_VM_EOF, and the VMDESCRIPTION record (0x06, be32 length, JSON) that describes them. A
  receiver that keeps RAM only reads the whole part (:class:`DeviceTail`): it is complete once the
  bytes received end with ``EOF, VMDESCRIPTION, be32 len, JSON`` of exactly that length and the
  JSON's device list walks the part section by section, each header where the previous footer
  ends. Without a VMDESCRIPTION the part ends where the source closes the connection.
* Return-path messages (destination to source, on the main channel's socket): be16 type, be16
  length, data; SHUT (1, be32 0 = success) ends the return path, PONG (2, be32) answers PING.

Layouts: docs/qemu.md, "QEMU as the source".
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from livemig.errors import WireError
from livemig.wire.buffer import ReceiveBuffer
from livemig.wire.constants import QEMU_VM_EOF, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL, QEMU_VM_VMDESCRIPTION
from livemig.wire.events import ConfigSubsection, DeviceSection, DeviceSections
from livemig.wire.layout import BE32, MAX_VMDESC, SECTION_LONG, SECTION_SHORT, SECTION_TAIL

#: return-path message types (migration.c, enum mig_rp_message_type)
MIG_RP_MSG_SHUT: Final = 1
MIG_RP_MSG_PONG: Final = 2
_RP_HEADER = struct.Struct(">HH")
#: configuration subsections livemig can read, and the size of their fields (None: variable)
CONFIG_SUBSECTIONS: Final = {
    "configuration/capabilities": None,
    "configuration/target-page-bits": 4,
    "configuration/uuid": 16,
}
#: largest device part (SECTION_FULLs, EOF, VMDESCRIPTION) accepted: QEMU's q35 sends ~80 KB
MAX_DEVICE_PART: Final = 2 * MAX_VMDESC


def rp_message(msg_type: int, data: bytes) -> bytes:
    """One return-path message: be16 type, be16 length, data."""
    return _RP_HEADER.pack(msg_type, len(data)) + data


def rp_shut(failed: bool) -> bytes:
    """SHUT: this destination sends nothing more on the return path; be32 1 if it failed, else 0."""
    return rp_message(MIG_RP_MSG_SHUT, BE32.pack(int(failed)))


def rp_pong(value: int) -> bytes:
    """PONG, the answer to COMMAND PING ``value``."""
    return rp_message(MIG_RP_MSG_PONG, BE32.pack(value))


def read_config_subsection(rx: ReceiveBuffer) -> ConfigSubsection | None:
    """Parse one configuration subsection at the start of ``rx`` (whose first byte is 0x05) and
    consume it; None when incomplete. WireError for one livemig cannot read."""
    if len(rx) < 2:
        return None
    namelen = rx.byte(1)
    if len(rx) < 2 + namelen + 4:
        return None
    raw = rx.peek(2, namelen)
    name = raw.decode("ascii", "replace")
    (version,) = rx.unpack(BE32, 2 + namelen)
    at = 2 + namelen + 4
    if name not in CONFIG_SUBSECTIONS:
        why = "its fields have no length prefix, so it cannot be skipped"
        raise WireError("main stream: configuration subsection", name, " or ".join(CONFIG_SUBSECTIONS), note=why)
    if version != 1:
        raise WireError(f"main stream: {name} version", version, 1)
    value: list[str] | int | bytes
    if name == "configuration/capabilities":
        if len(rx) < at + 4:
            return None
        (count,) = rx.unpack(BE32, at)
        if count > 255:
            raise WireError("main stream: configuration/capabilities count", count, "<= 255")
        at += 4
        names = []
        for _ in range(count):
            if len(rx) < at + 1 or len(rx) < at + 1 + rx.byte(at):
                return None
            n = rx.byte(at)
            names.append(rx.peek(at + 1, n).decode("ascii", "replace"))
            at += 1 + n
        value = names
    else:
        size = CONFIG_SUBSECTIONS[name]
        assert size is not None
        if len(rx) < at + size:
            return None
        value = rx.unpack(BE32, at)[0] if size == 4 else rx.peek(at, size)
        at += size
    rx.skip(at)
    return ConfigSubsection(name, version, value)


def _header_at(data: bytes, at: int) -> tuple[int, str, int, int, int] | None:
    """(section_id, idstr, instance_id, version_id, header size) of a SECTION_FULL at ``at``."""
    if len(data) < at + SECTION_LONG.size or data[at] != QEMU_VM_SECTION_FULL:
        return None
    _, section_id, idlen = SECTION_LONG.unpack_from(data, at)
    end = at + SECTION_LONG.size + idlen
    if len(data) < end + SECTION_TAIL.size:
        return None
    instance_id, version_id = SECTION_TAIL.unpack_from(data, end)
    idstr = data[at + SECTION_LONG.size : end].decode("ascii", "replace")
    return section_id, idstr, instance_id, version_id, end + SECTION_TAIL.size - at


def _walk(data: bytes, end: int, devices: list[Any]) -> list[DeviceSection] | None:
    """The sections of ``data[:end]`` as the VMDESCRIPTION's ``devices`` list names them: each
    header where it is expected, the next one just after the previous section's footer, the last
    footer just before ``end``. None when the bytes do not walk that way."""
    out: list[DeviceSection] = []
    at = 0
    for i, dev in enumerate(devices):
        head = _header_at(data, at)
        if head is None or (head[1], head[2]) != (dev.get("name"), dev.get("instance_id")):
            return None
        section_id, idstr, instance_id, version_id, _ = head
        footer = SECTION_SHORT.pack(QEMU_VM_SECTION_FOOTER, section_id)
        if i + 1 == len(devices):
            if data[end - len(footer) : end] != footer:
                return None
            nxt = end
        else:
            want = devices[i + 1]
            nxt = -1
            search = at + head[4]
            while True:
                hit = data.find(footer + bytes([QEMU_VM_SECTION_FULL]), search, end)
                if hit < 0:
                    return None
                cand = _header_at(data, hit + len(footer))
                if cand is not None and (cand[1], cand[2]) == (want.get("name"), want.get("instance_id")):
                    nxt = hit + len(footer)
                    break
                search = hit + 1
        out.append(DeviceSection(section_id, idstr, instance_id, version_id, nxt - at))
        at = nxt
    return out if at == end else None


class DeviceTail:
    """Reads QEMU's device part, from its first SECTION_FULL byte to the end of the VMDESCRIPTION
    (see the module doc). :meth:`take` consumes from a ReceiveBuffer and returns the
    :class:`DeviceSections` once the part is complete, else None."""

    def __init__(self) -> None:
        self._data = bytearray()

    def take(self, rx: ReceiveBuffer) -> DeviceSections | None:
        n = len(rx)
        if n:
            self._data += rx.peek(0, n)
            rx.skip(n)
        if len(self._data) > MAX_DEVICE_PART:
            raise WireError("main stream: device sections after RAM", len(self._data), f"<= {MAX_DEVICE_PART} bytes",
                            note="no EOF and VMDESCRIPTION at their end")
        if self._data.endswith(b"}"):
            done = self._described()
            if done is not None:
                return done
        if rx.closed:
            return self._closed()
        return None

    def _described(self) -> DeviceSections | None:
        data = bytes(self._data)
        marker = bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION])
        pos = data.rfind(marker)
        while pos >= 0:
            length_at = pos + len(marker)
            if len(data) >= length_at + 5 and BE32.unpack_from(data, length_at)[0] == len(data) - length_at - 4:
                text = data[length_at + 4 :]
                try:
                    desc = json.loads(text)
                    devices = desc["devices"]
                except (ValueError, KeyError, TypeError):
                    devices = None
                if isinstance(devices, list) and all(isinstance(d, dict) for d in devices):
                    sections = _walk(data, pos, devices)
                    if sections is not None:
                        return DeviceSections(sections, pos, text.decode("utf-8"))
            pos = data.rfind(marker, 0, pos)
        return None

    def _closed(self) -> DeviceSections:
        """The source closed: a part that ends with EOF and carries no VMDESCRIPTION is accepted
        unwalked; anything else is a truncated stream."""
        if self._data.endswith(bytes([QEMU_VM_EOF])):
            return DeviceSections([], len(self._data) - 1, None)
        raise WireError("main stream: connection closed in the device sections after RAM "
                        f"({len(self._data)} bytes, no EOF and VMDESCRIPTION at their end)")
