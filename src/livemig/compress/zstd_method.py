"""``zstd``: one zstd frame per channel, ZSTD_e_flush at the end of each packet, never ended
(qemu-multifd.md §3.3). Level 0 means zstd's default level (3), as in QEMU.

pyzstd is used (not python-zstandard) because its decompressor takes ``max_length``: a hostile
payload cannot make the receiver allocate more than the packet's pages."""

from __future__ import annotations

from collections.abc import Sequence

import pyzstd

from ..errors import PayloadError
from ..wire.constants import FLAG_ZSTD
from .base import Buffer, Compressor, Decompressor, Method

#: keep frames decodable by default decoders (ZSTD_WINDOWLOG_LIMIT_DEFAULT = 27)
_MAX_WINDOW_LOG = 27


class _Send(Compressor):
    def __init__(self, level: int) -> None:
        # levels 0..20 with an unknown source size use windowLog <= 25: within the decoder limit
        self._z = pyzstd.ZstdCompressor({pyzstd.CParameter.compressionLevel: level})

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        out: list[Buffer] = []
        for r in runs:
            chunk = self._z.compress(r, pyzstd.ZstdCompressor.CONTINUE)
            if chunk:
                out.append(chunk)
        out.append(self._z.flush(pyzstd.ZstdCompressor.FLUSH_BLOCK))
        return out


class _Recv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._z = pyzstd.ZstdDecompressor(option={pyzstd.DParameter.windowLogMax: _MAX_WINDOW_LOG})

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        want = normal_pages * self.page_size
        try:
            out = self._z.decompress(payload, want)
            if len(out) == want and not self._z.needs_input:
                # the block flush may leave input that must produce nothing more
                extra = self._z.decompress(b"", 1)
                if extra:
                    raise PayloadError(f"zstd: payload decompresses to more than {want} bytes ({normal_pages} pages)")
        except pyzstd.ZstdError as exc:
            raise PayloadError(f"zstd: decompressStream returned {exc}") from exc
        if self._z.eof:
            raise PayloadError("zstd: frame ended; a multifd zstd frame is never ended")
        if len(out) != want:
            raise PayloadError(f"zstd: packet size received {len(out)} size expected {want}")
        return out


class Zstd(Method):
    name = "zstd"
    flag = FLAG_ZSTD
    levels = (0, 20)

    def backend(self) -> str:
        return f"cpu: zstd {pyzstd.zstd_version}"

    def compressor(self, channel: int) -> Compressor:
        return _Send(self.level)

    def decompressor(self, channel: int) -> Decompressor:
        return _Recv(self.page_size)


METHOD = Zstd
