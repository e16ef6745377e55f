"""``zlib``: one zlib stream per channel, Z_SYNC_FLUSH at the end of each packet, never finished
(docs/wire.md, "Payloads"). The stream header (78 01 at level 1) opens the channel's first packet and no
adler32 trailer is ever sent."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from .._types import Buffer
from ..errors import PayloadError
from ..wire.constants import FLAG_ZLIB
from .base import Compressor, Decompressor, Method


class _Send(Compressor):
    def __init__(self, level: int) -> None:
        # windowBits 15, memLevel 8, default strategy: QEMU's deflateInit(level)
        self._z = zlib.compressobj(level, zlib.DEFLATED, 15, 8)

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        out: list[Buffer] = []
        for r in runs:
            chunk = self._z.compress(r)
            if chunk:
                out.append(chunk)
        out.append(self._z.flush(zlib.Z_SYNC_FLUSH))
        return out


class _Recv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._z = zlib.decompressobj(15)

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        want = normal_pages * self.page_size
        try:
            out = self._z.decompress(payload, want)
            tail = self._z.unconsumed_tail
            if tail:
                # only the sync flush's empty stored block may remain once the pages are full
                extra = self._z.decompress(tail, 1)
                if extra or self._z.unconsumed_tail:
                    raise PayloadError(f"zlib: payload inflates to more than {want} bytes ({normal_pages} pages)")
        except zlib.error as exc:
            raise PayloadError(f"zlib: inflate failed: {exc}") from exc
        if self._z.eof:
            raise PayloadError("zlib: stream ended (Z_STREAM_END); a multifd zlib stream is never finished")
        if len(out) != want:
            raise PayloadError(f"zlib: packet size received {len(out)} size expected {want}")
        return out


class Zlib(Method):
    name = "zlib"
    flag = FLAG_ZLIB
    levels = (0, 9)

    def backend(self) -> str:
        return f"cpu: zlib {zlib.ZLIB_RUNTIME_VERSION}"

    def compressor(self, channel: int) -> Compressor:
        return _Send(self.level)

    def decompressor(self, channel: int) -> Decompressor:
        return _Recv(self.page_size)


METHOD = Zlib
