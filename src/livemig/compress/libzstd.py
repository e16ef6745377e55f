"""libzstd through ctypes: compress and decompress without intermediate Python buffers.

QEMU's zstd method keeps one never-ended frame per channel (docs/wire.md, "Payloads"). pyzstd does that
too, but hands every packet back as a fresh Python object and cannot decode into a caller's buffer;
with libzstd's own streaming API the receiver decodes straight into guest RAM (no copy, no 512 KiB
allocation per packet) and the sender writes into a buffer it keeps. ctypes releases the GIL for the
duration of each call, so channels compress in parallel. The library is the zstd pyzstd bundles when
its extension exports zstd's functions, else the system's ``libzstd.so.1`` (Debian's ``libzstd1``);
without either the zstd method falls back to pyzstd's own API.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence

import numpy as np

from .._types import Buffer
from ..errors import PayloadError

ZSTD_c_compressionLevel = 100
ZSTD_d_windowLogMax = 100
ZSTD_e_continue = 0
ZSTD_e_flush = 1
#: ZSTD_WINDOWLOG_LIMIT_DEFAULT: what default decoders accept
WINDOW_LOG_MAX = 27
#: output headroom beyond ZSTD_compressBound, which bounds one whole frame: a never-ended streaming
#: frame also writes its frame header once and a block header at every flush
_FLUSH_HEADROOM = 4096


class InBuffer(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class OutBuffer(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


def _bundled() -> str | None:
    """The file of the zstd that pyzstd runs on (backports.zstd's extension, which exports zstd's
    functions), or None."""
    try:
        from backports.zstd import _zstd  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return None
    return getattr(_zstd, "__file__", None)


def _load() -> ctypes.CDLL | None:
    """The newest zstd that loads and exports the streaming and bufferless functions: pyzstd's own
    (1.5.7 here: about 6 % smaller output than Debian 12's 1.5.4 at level 1, at the same speed), else
    the system's ``libzstd.so.1``."""
    found: list[ctypes.CDLL] = []
    for name in (_bundled(), ctypes.util.find_library("zstd"), "libzstd.so.1"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.ZSTD_compressContinue, lib.ZSTD_decompressStream  # noqa: B018 - both exported?
        except (OSError, AttributeError):
            continue
        lib.ZSTD_versionString.restype = ctypes.c_char_p
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_createCCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeCCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_DCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_compressStream2.argtypes = [ctypes.c_void_p, ctypes.POINTER(OutBuffer),
                                             ctypes.POINTER(InBuffer), ctypes.c_int]
        lib.ZSTD_compressStream2.restype = ctypes.c_size_t
        lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(OutBuffer),
                                              ctypes.POINTER(InBuffer)]
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        lib.ZSTD_compressBound.restype = ctypes.c_size_t
        lib.ZSTD_versionNumber.restype = ctypes.c_uint
        lib.ZSTD_compressBegin.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ZSTD_compressBegin.restype = ctypes.c_size_t
        lib.ZSTD_compressContinue.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_void_p, ctypes.c_size_t]
        lib.ZSTD_compressContinue.restype = ctypes.c_size_t
        found.append(lib)
    return max(found, key=lambda lib: int(lib.ZSTD_versionNumber()), default=None)


LIB = _load()


def version() -> str:
    return LIB.ZSTD_versionString().decode() if LIB else ""


def _addr(buf: Buffer) -> tuple[int, np.ndarray]:
    """Address of a buffer's first byte (and the array that keeps it alive), without copying."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return int(arr.ctypes.data), arr


def _check(ret: int, what: str) -> int:
    assert LIB is not None
    if LIB.ZSTD_isError(ret):
        raise PayloadError(f"zstd: {what} returned {LIB.ZSTD_getErrorName(ret).decode()}")
    return ret


class PacketCompressor:
    """One never-ended zstd frame, written with zstd's bufferless API (``ZSTD_compressContinue``):
    each call emits the blocks of exactly its input, as ZSTD_e_flush does, and never ends the frame,
    so the stream is the one QEMU's streaming compressor writes (docs/wire.md, "Payloads").

    Each packet's pages are first copied to the end of one packet-sized buffer. The streaming API
    copies input into a window buffer that wraps every window's worth of input, after which zstd's
    match finder runs its slower two-segment (``extDict``) variant for most blocks; here every packet
    is one contiguous segment that replaces the previous one, so it runs the plain one (about 8 %
    faster at level 1, 70 % at level 3). Ending every packet at the same address matters: when new
    input overlaps the old segment, zstd keeps of the old one only what lies above the new input's
    end (nothing here, whatever the sizes), while a shorter packet copied to the start would leave
    the old tail as a second segment. The window never holds a byte that changed after zstd saw
    it: the copy writes only the new input, and zstd drops the old segment before reading it.
    Matches across packets (rare between unrelated pages) are lost: about 1 % more output.
    """

    def __init__(self, level: int, max_input: int = 512 * 1024) -> None:
        assert LIB is not None
        self._cctx = LIB.ZSTD_createCCtx()
        if not self._cctx:
            raise MemoryError("ZSTD_createCCtx failed")
        _check(LIB.ZSTD_compressBegin(self._cctx, level), "compressBegin")
        self._in = bytearray(max_input)
        self._in_addr, self._in_arr = _addr(self._in)
        # + the frame header, written with the first packet
        self._out = bytearray(LIB.ZSTD_compressBound(max_input) + _FLUSH_HEADROOM)
        self._out_addr, self._out_arr = _addr(self._out)

    def compress(self, runs: Sequence[Buffer]) -> bytes:
        """The payload of one packet whose pages are ``runs``, in order; PayloadError beyond
        ``max_input`` bytes."""
        assert LIB is not None
        views = [memoryview(run).cast("B") for run in runs]
        n = sum(v.nbytes for v in views)
        end = len(self._in)
        if n > end:
            raise PayloadError(f"zstd: packet of more than {end} bytes")
        pos = start = end - n  # every packet ends at the buffer's end: see the class docstring
        for v in views:
            self._in[pos : pos + v.nbytes] = v
            pos += v.nbytes
        written = _check(LIB.ZSTD_compressContinue(self._cctx, self._out_addr, len(self._out), self._in_addr + start,
                                                   n), "compressContinue")
        return bytes(memoryview(self._out)[:written])

    def __del__(self) -> None:
        if LIB is not None and getattr(self, "_cctx", None):
            LIB.ZSTD_freeCCtx(self._cctx)


class StreamDecompressor:
    """Decodes one channel's frame, packet by packet, straight into the caller's buffers."""

    def __init__(self) -> None:
        assert LIB is not None
        self._dctx = LIB.ZSTD_createDCtx()
        if not self._dctx:
            raise MemoryError("ZSTD_createDCtx failed")
        _check(LIB.ZSTD_DCtx_setParameter(self._dctx, ZSTD_d_windowLogMax, WINDOW_LOG_MAX), "setParameter(window)")
        self._spare = bytearray(1)
        self._spare_addr, self._spare_arr = _addr(self._spare)

    def decompress_into(self, payload: Buffer, outs: Sequence[memoryview]) -> None:
        """Fill ``outs`` exactly from ``payload``; PayloadError if it holds less, more, or ends the frame."""
        assert LIB is not None
        src, keep_in = _addr(payload)
        inp = InBuffer(src, keep_in.nbytes, 0)
        want = sum(o.nbytes for o in outs)
        got = 0
        for o in outs:
            dst, keep_out = _addr(o)
            out = OutBuffer(dst, o.nbytes, 0)
            while out.pos < out.size:
                before = (inp.pos, out.pos)
                ret = _check(LIB.ZSTD_decompressStream(self._dctx, ctypes.byref(out), ctypes.byref(inp)),
                             "decompressStream")
                if ret == 0:
                    raise PayloadError("zstd: frame ended; a multifd zstd frame is never ended")
                if (inp.pos, out.pos) == before:
                    got += out.pos
                    raise PayloadError(f"zstd: packet size received {got} size expected {want}")
            got += out.pos
        # what is left (the rest of the payload, or data the decoder already holds) must decode to nothing
        while True:
            spare = OutBuffer(self._spare_addr, 1, 0)
            before = inp.pos
            ret = _check(LIB.ZSTD_decompressStream(self._dctx, ctypes.byref(spare), ctypes.byref(inp)),
                         "decompressStream")
            if spare.pos:
                raise PayloadError(f"zstd: payload decompresses to more than {want} bytes")
            if ret == 0:
                raise PayloadError("zstd: frame ended; a multifd zstd frame is never ended")
            if inp.pos == inp.size or inp.pos == before:
                break

    def __del__(self) -> None:
        if LIB is not None and getattr(self, "_dctx", None):
            LIB.ZSTD_freeDCtx(self._dctx)
