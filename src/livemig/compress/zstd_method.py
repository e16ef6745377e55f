"""``zstd`` (docs/wire.md, "Payloads"): QEMU writes one never-ended frame per channel, a flush
(ZSTD_e_flush) at the end of each packet; its receiver also takes frames that end and start again.
Level 0 means zstd's default level (3), as in QEMU.

Both sides use zstd through ctypes (:mod:`.libzstd`): the zstd pyzstd bundles (1.5.7, about 6 %
smaller output than Debian 12's libzstd 1.5.4 at level 1, at the same speed) when its extension
exports zstd's functions, else the system's libzstd. The sender writes one whole frame per packet,
from guest RAM (:class:`.libzstd.PacketCompressor`); the receiver decodes such a packet in one call
straight into guest RAM, and any other stream (QEMU's) with the streaming decoder. Without a
loadable zstd library both sides use pyzstd's API (one never-ended frame; its decompressor takes
``max_length``: a hostile payload cannot make the receiver allocate more than the packet's pages).
``LIVEMIG_ZSTD=pyzstd`` forces pyzstd's API on both sides. Every receiver reads every sender's
stream."""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

from .._types import Buffer
from ..errors import PayloadError
from ..wire.constants import FLAG_ZSTD, PAGE_SIZE
from . import libzstd
from .base import Compressor, Decompressor, Method


def _pyzstd() -> ModuleType:
    """pyzstd, imported only when its API is used (the import takes ~0.1 s: it pulls in asyncio)."""
    import pyzstd

    return pyzstd


def _use_lib() -> bool:
    """Whether both sides use zstd through :mod:`.libzstd` (else pyzstd's API)."""
    return libzstd.LIB is not None and os.environ.get("LIVEMIG_ZSTD", "") != "pyzstd"

#: keep frames decodable by default decoders (ZSTD_WINDOWLOG_LIMIT_DEFAULT = 27)
_MAX_WINDOW_LOG = 27


class _Send(Compressor):
    def __init__(self, level: int) -> None:
        # levels 0..20 with an unknown source size use windowLog <= 25: within the decoder limit
        pyzstd = _pyzstd()
        self._mode, self._flush = pyzstd.ZstdCompressor.CONTINUE, pyzstd.ZstdCompressor.FLUSH_BLOCK
        self._z = pyzstd.ZstdCompressor({pyzstd.CParameter.compressionLevel: level})

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        out: list[Buffer] = []
        for r in runs:
            chunk = self._z.compress(r, self._mode)
            if chunk:
                out.append(chunk)
        out.append(self._z.flush(self._flush))
        return out


class _Recv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        pyzstd = _pyzstd()
        self._error = pyzstd.ZstdError
        # frames may end and start again at packet ends (livemig's lib sender: one per packet)
        self._z = pyzstd.EndlessZstdDecompressor(option={pyzstd.DParameter.windowLogMax: _MAX_WINDOW_LOG})

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        want = normal_pages * self.page_size
        try:
            # pyzstd's EndlessZstdDecompressor takes bytes only (a memoryview raises a bare TypeError)
            out: bytes = self._z.decompress(bytes(payload), want)
            if len(out) == want and not self._z.needs_input:
                # the block flush may leave input that must produce nothing more
                extra = self._z.decompress(b"", 1)
                if extra:
                    raise PayloadError(f"zstd: payload decompresses to more than {want} bytes ({normal_pages} pages)")
        except self._error as exc:
            raise PayloadError(f"zstd: decompressStream returned {exc}") from exc
        if len(out) != want:
            raise PayloadError(f"zstd: packet size received {len(out)} size expected {want}")
        return out


class _LibSend(Compressor):
    def __init__(self, level: int) -> None:
        self._z = libzstd.PacketCompressor(level)

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        return [self._z.compress(runs)]


class _LibRecv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._z = libzstd.PacketDecompressor()

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        out = bytearray(normal_pages * self.page_size)
        self._z.decompress_into(payload, [memoryview(out)])
        return out

    def decompress_into(self, payload: Buffer, outs: Sequence[memoryview], page_size: int = PAGE_SIZE) -> None:
        self._z.decompress_into(payload, outs)


class Zstd(Method):
    name = "zstd"
    flag = FLAG_ZSTD
    levels = (0, 20)

    def backend(self) -> str:
        if _use_lib():
            return (f"cpu: zstd {libzstd.version()}; one frame per packet from guest RAM, "
                    "decoded into guest RAM")
        return f"cpu: zstd; pyzstd (zstd {_pyzstd().zstd_version}) both ways"

    def compressor(self, channel: int) -> Compressor:
        return _LibSend(self.level) if _use_lib() else _Send(self.level)

    def decompressor(self, channel: int) -> Decompressor:
        return _LibRecv(self.page_size) if _use_lib() else _Recv(self.page_size)


METHOD = Zstd
