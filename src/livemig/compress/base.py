"""What a compression method is: a per-channel compressor and decompressor with QEMU's payload format.

A method is one module under ``livemig.compress`` defining a :class:`Method` subclass, exported as
the module's ``METHOD``, and named in the registry's table of modules (``_MODULES`` in
``livemig.compress``). A method object is created once per migration side
with the level the user chose; it hands out one :class:`Compressor` (sender) or
:class:`Decompressor` (receiver) per multifd channel, because QEMU's streaming methods (zlib, zstd)
keep one stream per channel for the whole migration.

Contracts, shared by every method:

* ``Compressor.compress(runs)`` takes the packet's normal pages as a list of *contiguous runs* (each
  a buffer whose length is a multiple of the page size, in the order of the packet's offset list)
  and returns the payload as a list of buffers whose concatenation is exactly what QEMU's sender of
  that method writes after the packet header (docs/wire.md, "Payloads"). Returning buffers (not one
  joined ``bytes``) lets ``none`` send guest RAM without copying it.
* ``Decompressor.decompress(payload, normal_pages)`` returns exactly ``normal_pages * page_size``
  bytes, the pages in offset order, or raises :class:`~livemig.errors.PayloadError` naming the
  method and what was wrong. It never returns more, never writes anywhere: the caller scatters.
* Both are called from one channel thread at a time, in packet order; they may release the GIL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from .._types import Buffer
from ..wire.constants import PAGE_SIZE

#: QEMU receivers size their input buffer at 2 x MULTIFD_PACKET_SIZE and we refuse anything larger.
MAX_PAYLOAD = 2 * 512 * 1024


class Compressor(ABC):
    """Sender side of one channel."""

    @abstractmethod
    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        """Payload buffers for the pages in ``runs`` (see the module contract)."""


class Decompressor(ABC):
    """Receiver side of one channel."""

    @abstractmethod
    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        """Exactly ``normal_pages * page_size`` bytes, or PayloadError."""

    def decompress_into(self, payload: Buffer, outs: Sequence[memoryview], page_size: int = PAGE_SIZE) -> None:
        """Decode ``payload`` straight into ``outs`` (the packet's page runs in guest RAM, in order).

        The output must fill ``outs`` exactly, else PayloadError; nothing is written anywhere else.
        The default decodes with :meth:`decompress` and copies; a method that can write into the
        destination directly (zstd through libzstd) overrides it and saves that copy.
        """
        total = sum(o.nbytes for o in outs)
        data = memoryview(self.decompress(payload, total // page_size)).cast("B")
        k = 0
        for o in outs:
            o[:] = data[k : k + o.nbytes]
            k += o.nbytes


class Method(ABC):
    """A compression method: its QEMU name, packet flag, level range and backends."""

    #: QEMU's ``multifd-compression`` value
    name: ClassVar[str]
    #: MULTIFD_FLAG_* bits this method sets in each data packet
    flag: ClassVar[int]
    #: (min, max) of ``multifd-<name>-level``, or None when the method has no level
    levels: ClassVar[tuple[int, int] | None] = None
    #: True when the payload is the packet's normal pages byte for byte, in offset order (``none``):
    #: the receiver then reads it straight into guest RAM and its size must be pages x page size
    raw_payload: ClassVar[bool] = False

    def __init__(self, level: int = 1, page_size: int = PAGE_SIZE) -> None:
        self.level = level
        self.page_size = page_size

    @classmethod
    def unavailable(cls) -> str | None:
        """None if the method can run here, else why not and what to install."""
        return None

    def backend(self) -> str:
        """What really does the work here, e.g. ``cpu: zlib 1.2.13`` or ``hardware: QAT``."""
        return "cpu"

    def accelerated(self) -> bool:
        """True when a hardware accelerator does the work."""
        return False

    @abstractmethod
    def compressor(self, channel: int) -> Compressor:
        """A fresh sender state for ``channel``."""

    @abstractmethod
    def decompressor(self, channel: int) -> Decompressor:
        """A fresh receiver state for ``channel``."""


def total_len(runs: Sequence[Buffer]) -> int:
    """Sum of the byte lengths of ``runs``."""
    return sum(memoryview(r).nbytes for r in runs)
