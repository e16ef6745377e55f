"""Byte layouts of the main stream's records and the limits the reader enforces.

One ``struct.Struct`` per fixed part of a record (all big-endian, as QEMU writes them;
docs/wire.md, "Main stream"), shared by :mod:`livemig.wire.writers` and
:mod:`livemig.wire.reader` so the two cannot disagree.
"""

from __future__ import annotations

import struct
from typing import Final

from livemig.errors import LocalWireError

U8 = struct.Struct(">B")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
#: magic, version
FILE_HEADER = struct.Struct(">II")
#: type, section_id (PART, END, FOOTER)
SECTION_SHORT = struct.Struct(">BI")
#: type, section_id, idlen (START, FULL; idstr, instance_id and version_id follow)
SECTION_LONG = struct.Struct(">BIB")
#: instance_id, version_id
SECTION_TAIL = struct.Struct(">II")
#: type, cmd, len (COMMAND)
COMMAND = struct.Struct(">BHH")
#: type, len (CONFIGURATION, VMDESCRIPTION)
TYPE_LEN = struct.Struct(">BI")

#: longest idstr or RAM block id: its length is one byte on the wire
MAX_ID = 255
#: longest COMMAND payload: its length is a be16
MAX_COMMAND_DATA = 0xFFFF
#: default largest livemig blob the reader accepts
MAX_BLOB: Final = 64 * 1024 * 1024
#: largest VMDESCRIPTION JSON the reader accepts
MAX_VMDESC: Final = 64 * 1024 * 1024
#: largest machine type name the reader accepts (QEMU's are ~20 bytes)
MAX_MACHINE_TYPE: Final = 256
#: most RAM blocks one MEM_SIZE record may declare
MAX_RAM_BLOCKS: Final = 4096
#: smallest page size: RAM record flags go up to 0x200 and must stay below the page size (ram.h)
MIN_PAGE_SIZE: Final = 1024


def check_page_size(page_size: int) -> None:
    """LocalWireError unless ``page_size`` is a power of two >= :data:`MIN_PAGE_SIZE`."""
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise LocalWireError(f"page size {page_size} must be a power of two >= {MIN_PAGE_SIZE}")
