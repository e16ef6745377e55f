"""The reader's receive buffer: bytes fed so far, a read offset, and whether the peer closed.

Cost: amortized O(bytes fed). The bytes live in one ``bytearray``; consumed bytes are dropped
(compacted) on the next feed once they are at least half of it, so memory tracks what is not yet
consumed, not what was fed. Only :meth:`take` copies, once, out of the buffer.
"""

from __future__ import annotations

import struct

from livemig._types import Buffer


class ReceiveBuffer:
    """Unconsumed received bytes; offsets ``at`` count from the first unconsumed byte."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        #: True once the peer closed (the caller fed ``b""``)
        self.closed = False

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    @property
    def allocated(self) -> int:
        """Bytes held, consumed ones not yet compacted away included."""
        return len(self._buf)

    def feed(self, data: Buffer) -> None:
        """Append ``data`` (non-empty; the caller turns ``b""`` into :attr:`closed`)."""
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def byte(self, at: int = 0) -> int:
        """The byte at ``at`` (the caller checked that it is buffered)."""
        return self._buf[self._pos + at]

    def unpack(self, layout: struct.Struct, at: int = 0) -> tuple[int, ...]:
        """``layout`` unpacked at ``at`` (the caller checked ``len(self) >= at + layout.size``)."""
        return layout.unpack_from(self._buf, self._pos + at)

    def peek(self, at: int, n: int) -> bytes:
        """A copy of ``n`` bytes at ``at``, nothing consumed."""
        return bytes(self._buf[self._pos + at : self._pos + at + n])

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes."""
        self._pos += n

    def take(self, n: int) -> bytes:
        """Consume ``n`` bytes and return them (one copy)."""
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos : self._pos + n])
        self._pos += n
        return out
