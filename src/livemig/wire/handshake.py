"""MultiFDInit_t: the 64-byte record that opens every multifd channel (docs/wire.md, "Multifd handshake").

Layout (QEMU 7.2 and 10.2 ``migration/multifd.c``, packed, all integers big-endian)::

    off  size  field
      0     4  magic      0x11223344 (MULTIFD_MAGIC)
      4     4  version    1 (MULTIFD_VERSION)
      8    16  uuid       the sender's VM UUID, raw bytes (all zero when the VM has no -uuid)
     24     1  id         channel index 0..N-1
     25     7  unused1    zero
     32    32  unused2    4 x u64, zero

Sans-IO: :func:`encode_init` returns the bytes to write, :func:`decode_init` checks 64 bytes the
caller has read. The receiver's checks run in QEMU's order (magic, version, uuid, id), with one
deliberate difference: QEMU compares ``id > channels`` (so id == N slips through and indexes past
its array); we reject every ``id >= channels``. Duplicate ids are the caller's check, because only
the caller knows which channels already exist.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from dataclasses import dataclass

from livemig._types import Buffer
from livemig.errors import LocalWireError, WireError
from livemig.wire.constants import MULTIFD_MAGIC, MULTIFD_VERSION
from livemig.wire.packet import check_magic_version

#: size of MultiFDInit_t on the wire
INIT_SIZE = 64
#: magic, version, uuid, id, then 7 + 32 reserved zero bytes
_INIT = struct.Struct(">II16sB39x")
assert _INIT.size == INIT_SIZE

_UUID_LEN = 16


@dataclass(frozen=True)
class MultiFDInit:
    """A validated MultiFDInit_t: the sender's VM UUID (16 raw bytes) and the channel index."""

    uuid: bytes
    channel_id: int


def _uuid_text(raw: bytes) -> str:
    return str(_uuid.UUID(bytes=bytes(raw)))


def encode_init(uuid: bytes, channel_id: int) -> bytes:
    """The 64 bytes a multifd sender writes first on channel ``channel_id``.

    Raises LocalWireError for a uuid that is not 16 bytes or a channel id outside 0..255 (a u8).
    """
    if len(uuid) != _UUID_LEN:
        raise LocalWireError(f"multifd init: uuid must be {_UUID_LEN} bytes, got {len(uuid)}")
    if not 0 <= channel_id <= 0xFF:
        raise LocalWireError(f"multifd init: channel id {channel_id} out of range 0..255")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, bytes(uuid), channel_id)


def decode_init(buf: Buffer, *, expected_uuid: bytes, channels: int) -> MultiFDInit:
    """Validate a received MultiFDInit_t and return its uuid and channel id.

    ``buf`` must be exactly :data:`INIT_SIZE` bytes. Checks, in QEMU's order: magic, version, uuid
    (byte-for-byte against ``expected_uuid``), then ``0 <= id < channels``. Each failure raises
    :class:`~livemig.errors.WireError` whose text names the field, the value received and the value
    expected; ``err.value`` / ``err.expected`` carry them too. The reserved bytes are not checked
    (QEMU does not read them). Raises LocalWireError for a bad ``expected_uuid`` or ``channels``
    (caller bugs, not wire errors).
    """
    if len(expected_uuid) != _UUID_LEN:
        raise LocalWireError(f"multifd init: expected_uuid must be {_UUID_LEN} bytes, got {len(expected_uuid)}")
    if not 1 <= channels <= 0xFF + 1:
        raise LocalWireError(f"multifd init: channels must be 1..256, got {channels}")
    view = memoryview(buf).cast("B")
    if view.nbytes != INIT_SIZE:
        raise WireError("multifd: initial packet length", view.nbytes, INIT_SIZE)
    magic, version, uuid, channel_id = _INIT.unpack(view)
    check_magic_version(magic, version)
    if uuid != bytes(expected_uuid):
        # the expected uuid is the destination's secret: never quoted back to whoever connected
        raise WireError(f"multifd: uuid on channel {channel_id}", _uuid_text(uuid), "this destination's uuid")
    if channel_id >= channels:
        raise WireError("multifd: channel id", channel_id, f"< {channels}", note="the number of channels")
    return MultiFDInit(uuid=uuid, channel_id=channel_id)
