"""Type aliases shared across packages."""

from __future__ import annotations

from typing import TypeAlias

#: anything with the buffer protocol that livemig reads bytes from: ``bytes``, ``bytearray`` or a
#: ``memoryview`` (of guest RAM, a receive buffer, ...)
Buffer: TypeAlias = bytes | bytearray | memoryview
