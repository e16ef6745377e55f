"""Events of the main stream, as :class:`~livemig.wire.reader.StreamReader` returns them.

Frozen dataclasses, one per record kind the reader accepts (docs/wire.md, "Main stream"), plus
:class:`Closed` for the end of the connection and the :data:`NEED_DATA` sentinel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias


@dataclass(frozen=True)
class Header:
    """The file header was valid; ``version`` is 3."""

    version: int


@dataclass(frozen=True)
class Configuration:
    """The CONFIGURATION record: the source's machine type (comparing it is the caller's policy)."""

    machine_type: str


@dataclass(frozen=True)
class SectionStart:
    """SECTION_START: a live section opens; its payload events and then a checked footer follow."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionFull:
    """SECTION_FULL: a whole section in one record (same fields as :class:`SectionStart`)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionPart:
    """SECTION_PART of a section opened by :class:`SectionStart`."""

    section_id: int


@dataclass(frozen=True)
class SectionEnd:
    """SECTION_END of a section opened by :class:`SectionStart`; the section is closed after it."""

    section_id: int


@dataclass(frozen=True)
class MemSize:
    """RAM_SAVE_FLAG_MEM_SIZE: the source's RAM blocks as (id, used_length), in wire order."""

    blocks: list[tuple[str, int]]


@dataclass(frozen=True)
class ZeroPage:
    """RAM_SAVE_FLAG_ZERO: the page at ``offset`` in ``block`` is all zero (block resolved, never None)."""

    block: str
    offset: int


@dataclass(frozen=True)
class Page:
    """RAM_SAVE_FLAG_PAGE: ``data`` (one page) belongs at ``offset`` in ``block``."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class MultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: wait for one SYNC packet on every multifd channel, then release them."""


@dataclass(frozen=True)
class Eos:
    """RAM_SAVE_FLAG_EOS: the end of this section's RAM records (no sync in per-round mode)."""


@dataclass(frozen=True)
class Blob:
    """The payload of a livemig section (idstr starting with "livemig/")."""

    section_id: int
    idstr: str
    data: bytes


@dataclass(frozen=True)
class SwitchoverStart:
    """COMMAND SWITCHOVER_START: the source stopped the guest; the final sections follow."""


@dataclass(frozen=True)
class Command:
    """A COMMAND the reader accepts but gives no meaning to: OPEN_RETURN_PATH (1) or PING (2, be32 data)."""

    cmd: int
    data: bytes


@dataclass(frozen=True)
class PostcopyAdvise:
    """COMMAND POSTCOPY_ADVISE (3): post-copy may follow. ``page_size_summary``: the OR of every
    RAM block's page size; ``target_page_size``: the guest's page size (both 0 when the 0-byte form
    came: no RAM post-copy)."""

    page_size_summary: int
    target_page_size: int


@dataclass(frozen=True)
class PostcopyDiscard:
    """COMMAND POSTCOPY_RAM_DISCARD (6): drop these ranges of RAM block ``block`` (they come again
    in post-copy). ``ranges``: (start, length) pairs in bytes."""

    block: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class PostcopyListen:
    """COMMAND POSTCOPY_LISTEN (4): the destination starts serving faults; device state follows."""


@dataclass(frozen=True)
class PostcopyRun:
    """COMMAND POSTCOPY_RUN (5): the device state is complete; the destination runs the guest."""


@dataclass(frozen=True)
class PostcopyResume:
    """COMMAND POSTCOPY_RESUME (9): a paused post-copy goes on, on this new main channel."""


@dataclass(frozen=True)
class RecvBitmap:
    """COMMAND RECV_BITMAP (10): the source asks which pages of RAM block ``block`` arrived."""

    block: str


@dataclass(frozen=True)
class Eof:
    """QEMU_VM_EOF: the device stream is complete. A VmDescription or the end of the connection follows."""


@dataclass(frozen=True)
class VmDescription:
    """The VMDESCRIPTION JSON after EOF (surfaced, not interpreted)."""

    json_text: str


@dataclass(frozen=True)
class Closed:
    """The peer closed the stream (``feed(b"")``) at a point where that is allowed: after Eof."""


@dataclass(frozen=True)
class ControlLine:
    """A livemig control line where the next record was due (only with ``control_lines=True``):
    ``data`` is every byte buffered from its ``{`` on; the stream ends there (docs/wire.md,
    "Return path": the source's Abort before the EOF)."""

    data: bytes


@dataclass(frozen=True)
class ConfigSubsection:
    """A configuration subsection: ``value`` is the capability names (capabilities), the target
    page bits (target-page-bits) or the 16 uuid bytes (uuid)."""

    name: str
    version: int
    value: list[str] | int | bytes


@dataclass(frozen=True)
class DeviceSection:
    """One SECTION_FULL of the device part, as received (not applied): ``size`` bytes with its
    header and footer."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    size: int


@dataclass(frozen=True)
class DeviceSections:
    """The device part up to its end: the sections in wire order (empty when there was no
    VMDESCRIPTION to walk them by), ``size`` bytes in all before EOF, and the VMDESCRIPTION JSON
    text (None when the source sent none)."""

    sections: list[DeviceSection]
    size: int
    description: str | None


Event: TypeAlias = (
    Header
    | Configuration
    | SectionStart
    | SectionFull
    | SectionPart
    | SectionEnd
    | MemSize
    | ZeroPage
    | Page
    | MultifdFlush
    | Eos
    | Blob
    | SwitchoverStart
    | Command
    | PostcopyAdvise
    | PostcopyDiscard
    | PostcopyListen
    | PostcopyRun
    | PostcopyResume
    | RecvBitmap
    | Eof
    | VmDescription
    | Closed
    | ControlLine
    | ConfigSubsection
    | DeviceSections
)


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"


#: returned by :meth:`StreamReader.next_event` when the buffered bytes hold no complete event
NEED_DATA: Final = NeedData.NEED_DATA
