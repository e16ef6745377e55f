"""Constants of QEMU's migration wire format, as found in QEMU 7.2 and 10.2 ``migration/``.

Each group names the QEMU file it comes from and the section of ``docs/wire.md`` that explains it.
"""

from __future__ import annotations

#: the target page size: QEMU's TARGET_PAGE_SIZE on x86 (``target/i386/cpu-param.h``: 1 << 12).
#: Source and destination must agree on it; it is the default of every ``page_size`` argument.
PAGE_SIZE = 4096

# MultiFDInit_t and MultiFDPacket_t (migration/multifd.h); docs/wire.md, "Multifd handshake" and
# "Multifd packet"
MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_PACKET_SIZE = 512 * 1024

# packet flags (migration/multifd.h); docs/wire.md, "Multifd packet"
FLAG_SYNC = 0x01
FLAG_NOCOMP = 0x00
FLAG_ZLIB = 0x02
FLAG_ZSTD = 0x04
FLAG_QPL = 0x08
FLAG_UADK = 0x10
FLAG_QATZIP = 0x20
FLAG_DEVICE_STATE = 0x40
#: 9.2+ mask: every compression bit
COMPRESSION_MASK = 0x1F << 1

# main stream header (migration/savevm.h); docs/wire.md, "Main stream"
QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 0x00000003
#: the obsolete v2 format: "SaveVM v2 format is obsolete and no longer supported" (10.2)
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002

# record types (migration/savevm.h)
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

# QEMU_VM_COMMAND sub-commands (migration/savevm.c, same numbering in 7.2 and 10.2)
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
# post-copy (docs/wire.md, "Main stream"; docs/postcopy.md)
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
#: post-copy recovery: the source resumes a paused post-copy on a new main channel
MIG_CMD_POSTCOPY_RESUME = 9
#: post-copy recovery: u8 length and a RAM block id; the destination answers its received bitmap
MIG_CMD_RECV_BITMAP = 10
#: POSTCOPY_RAM_DISCARD's format version (postcopy_ram_discard_version)
POSTCOPY_RAM_DISCARD_VERSION = 0
#: ranges in one POSTCOPY_RAM_DISCARD command, as QEMU sends them (MAX_DISCARDS_PER_COMMAND)
MAX_DISCARDS_PER_COMMAND = 12
#: 10.0+ only, sent just before the final SECTION_END sections
MIG_CMD_SWITCHOVER_START = 11
#: every sub-command's name, for error messages (livemig accepts 1 to 6, 9, 10 and 11)
MIG_CMD_NAMES = {
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}

# RAM record flags (migration/ram.c, ram.h in 10.2)
#: obsolete since 2009, never sent
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
#: legacy `compress` capability, removed in 9.1
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

#: the RAM section: idstr "ram", instance 0, version 4
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4

#: livemig's own sections (one length-prefixed blob each) have idstrs starting with this
LIVEMIG_SECTION_PREFIX = "livemig/"
