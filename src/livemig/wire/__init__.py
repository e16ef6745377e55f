"""Sans-IO codecs of QEMU's migration wire format (docs/wire.md describes it).

No sockets, no threads: every function takes or returns bytes, every fixed header is one
``struct.Struct``. Bad input from the peer raises :class:`livemig.errors.WireError` naming the
field, the value received and the value expected; asking a writer for something the format cannot
carry raises :class:`livemig.errors.LocalWireError`.

* :mod:`livemig.wire.handshake`: MultiFDInit_t, the 64 bytes opening each multifd channel.
* :mod:`livemig.wire.packet`: MultiFDPacket_t, the 1344-byte RAM packet header (4 KiB pages).
* :mod:`livemig.wire.stream`: the main stream's namespace: record writers (:mod:`~livemig.wire.writers`),
  events (:mod:`~livemig.wire.events`) and the :class:`StreamReader` (:mod:`~livemig.wire.reader`).
* :mod:`livemig.wire.constants`: QEMU's magic numbers, flags and record types.
* :mod:`livemig.wire.qemu`: what only a QEMU source sends (configuration subsections, the device
  sections after RAM up to the VMDESCRIPTION) and the return-path messages livemig answers it with.
"""

from __future__ import annotations

from livemig.wire import stream
from livemig.wire.handshake import INIT_SIZE, MultiFDInit, decode_init, encode_init
from livemig.wire.packet import (
    PacketHeader,
    check_packet,
    decode_packet,
    encode_packet,
    encode_sync,
    packet_len,
    page_count,
)

__all__ = [
    "stream",
    "INIT_SIZE",
    "MultiFDInit",
    "decode_init",
    "encode_init",
    "PacketHeader",
    "check_packet",
    "decode_packet",
    "encode_packet",
    "encode_sync",
    "packet_len",
    "page_count",
]
