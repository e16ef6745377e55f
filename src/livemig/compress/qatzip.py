"""``qatzip``: gzip members with QATzip's "QZ" extra header, one buffer per packet (docs/wire.md, "Payloads").

Wire format (what QEMU's ``multifd-qatzip.c`` sends through QATzip's default QZ_DEFLATE_GZIP_EXT
format, as QAT hardware writes it): the packet's normal pages, concatenated, cut into slices of at
most 64 KiB (``hw_buff_sz``); each slice is one gzip member (RFC 1952)::

    1f 8b 08 04 00000000 00 ff | 0c 00 | 'Q' 'Z' 08 00 | src_sz u32 LE | dest_sz u32 LE   (24 bytes)
    raw deflate of the slice (dest_sz bytes)
    crc32 u32 LE | isize u32 LE

where src_sz is the slice's length and dest_sz the deflate data's length. A full 512 KiB packet is
8 members. The receiver decodes *any* sequence of gzip members (QATzip's own software path writes
one member for the whole packet; plain gzip without the QZ field is accepted too), refuses a payload
over 1 MiB, checks each member's CRC32 and ISIZE, checks the QZ sizes against what the member really
holds, and requires exactly ``normal_pages x page_size`` bytes of output, never inflating more.

Backends, chosen once per process (``livemig accel`` shows which):

* **hardware**: ``libqatzip.so.3`` through ctypes (:mod:`.libqatzip`), one session per channel,
  sw_backup on, strict length checks, a new session after any error. Used only when the library
  loads *and* a QAT device serves its session (``hw_session_stat`` is not QZ_NO_HW). Set
  ``LIVEMIG_QATZIP=cpu`` to skip the probe and always use the CPU path, or ``LIVEMIG_QATZIP=lib``
  to force the library path without a device (QATzip's zlib software mode; for tests).
* **cpu**: the same wire format written here: ISA-L deflate (``isal`` package; it releases the GIL,
  so channel threads compress in parallel) for levels 1..3, zlib (memLevel 9, as QATzip's software
  path) for levels 4..9; CRC32 by ISA-L. libqatzip's own software fallback is plain zlib at every
  level, about 4x slower than ISA-L at level 1 and no better in ratio, so it is never used for
  migration.

Level map (``multifd-qatzip-level`` 1..9). Ratio A: 4 MiB of each Silesia file (dickens, mr, nci,
ooffice, samba) in 64 KiB members, input / deflate bytes. Ratio B and MB/s (one core, compress, page
bytes per second through this module): ``scripts/codec-speed.py --fill files:DIR --size 32M``,
DIR holding the Silesia corpus, on the 2-vCPU development VM, where zstd-1 ran at 421 MB/s and ratio
3.623:

=====  =============  =======  =======  ====  ==============================================
level  engine         ratio A  ratio B  MB/s  why
=====  =============  =======  =======  ====  ==============================================
1      ISA-L level 1  2.680    3.277    492   fastest; as good as zlib-1 (2.661), QATzip's SW level 1
2      ISA-L level 2  2.721    3.323    466
3      ISA-L level 3  2.758    3.365    303   ISA-L's best
4      zlib level 4   2.877    3.473     73   zlib-3 (2.812) would already beat ISA-L's best
5      zlib level 5   2.934    3.562     47
6      zlib level 6   2.964    3.614     29
7      zlib level 7   2.971    3.629     24
8      zlib level 8   2.981    3.649     16
9      zlib level 9   2.983    3.656     13   as QATzip's SW level 9
=====  =============  =======  =======  ====  ==============================================

ISA-L level 0 (ratio A 2.395) is not used: it is no faster than level 1 here. A higher level never
compresses these mixes worse; single files can dip by <0.6 % between neighbours (mr: ISA-L 3 vs 2,
zlib 5 vs 4). Decompression runs at 760-920 MB/s per core at every level (ISA-L inflate).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

try:
    import isal
    from isal import igzip_lib, isal_zlib
except ImportError as exc:  # a dependency in pyproject.toml; say what to install if it is missing
    raise ImportError(f"{exc}: install the isal package (pip install isal, or apt-get install python3-isal)") from exc

from .._types import Buffer
from ..errors import MethodUnavailable, ParameterError, PayloadError
from ..wire.constants import FLAG_QATZIP, PAGE_SIZE
from . import libqatzip
from .base import MAX_PAYLOAD, Compressor, Decompressor, Method
from .pagetable import INFLATE_ERRORS

#: QZ_HW_BUFF_SZ: input bytes per gzip member as QAT hardware cuts them
MEMBER_INPUT = 64 * 1024

#: gzip member header with the QZ extra subfield (QATzip ``qzGzipHeaderExt_T``), 24 bytes
QZ_HEADER = struct.Struct("<BBBBIBBHBBHII")
QZ_HEADER_SIZE = QZ_HEADER.size
#: gzip trailer: CRC32, ISIZE (input size mod 2^32)
TRAILER = struct.Struct("<II")

_GZIP_ID = b"\x1f\x8b"
_FTEXT, _FHCRC, _FEXTRA, _FNAME, _FCOMMENT = 1, 2, 4, 8, 16
_OS_UNKNOWN = 255

#: multifd-qatzip-level -> (engine, engine level); see the module docstring for the measurements
LEVEL_MAP: dict[int, tuple[str, int]] = {
    1: ("isal", 1), 2: ("isal", 2), 3: ("isal", 3),
    4: ("zlib", 4), 5: ("zlib", 5), 6: ("zlib", 6), 7: ("zlib", 7), 8: ("zlib", 8), 9: ("zlib", 9),
}  # fmt: skip


def member_header(src_sz: int, dest_sz: int) -> bytes:
    """The 24-byte GZIP_EXT member header for a slice of ``src_sz`` bytes deflated to ``dest_sz``."""
    return QZ_HEADER.pack(0x1F, 0x8B, 8, _FEXTRA, 0, 0, _OS_UNKNOWN, 12, ord("Q"), ord("Z"), 8, src_sz, dest_sz)


class _CpuSend(Compressor):
    """GZIP_EXT members written here: ISA-L or zlib raw deflate per <= 64 KiB slice."""

    def __init__(self, level: int) -> None:
        self.engine, self.elevel = LEVEL_MAP[level]
        # the channel's copy of the packet's pages, reused: a fresh 512 KiB buffer per packet would
        # cost a page fault per page (about 2.5 us per 4 KiB here)
        self._buf = bytearray()

    def _deflate(self, piece: memoryview) -> bytes:
        if self.engine == "isal":
            out: bytes = igzip_lib.compress(piece, self.elevel, igzip_lib.COMP_DEFLATE)
            return out
        z = zlib.compressobj(self.elevel, zlib.DEFLATED, -15, 9)
        return z.compress(piece) + z.flush()

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        # copy first, as QEMU does: the guest may write its pages meanwhile, and the deflate data
        # and the CRC32 must describe the same bytes
        total = sum(memoryview(r).nbytes for r in runs)
        if len(self._buf) < total:
            self._buf = bytearray(total)
        mv = memoryview(self._buf)[:total]
        pos = 0
        for r in runs:
            rv = memoryview(r).cast("B")
            mv[pos : pos + rv.nbytes] = rv
            pos += rv.nbytes
        out: list[Buffer] = []
        for off in range(0, mv.nbytes, MEMBER_INPUT):
            piece = mv[off : off + MEMBER_INPUT]
            body = self._deflate(piece)
            n = piece.nbytes
            out.append(member_header(n, len(body)))
            out.append(body)
            out.append(TRAILER.pack(isal_zlib.crc32(piece), n))
        return out


class _HwSend(Compressor):
    """libqatzip on a QAT device: one session per channel, one qzCompress(last=1) per packet."""

    def __init__(self, level: int) -> None:
        try:
            self.sess = libqatzip.QzSession(level, direction=libqatzip.QZ_DIR_COMPRESS)
        except libqatzip.QatzipError as exc:
            raise MethodUnavailable(f"qatzip: [sender] {exc}") from exc

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        if not runs:
            return []
        data = b"".join(runs)
        if not data:
            return []
        try:
            return [self.sess.compress(data)]
        except libqatzip.QatzipError as exc:
            raise PayloadError(f"qatzip: QATzip failed to compress all input: {exc}") from exc


def _check_size(payload: Buffer, normal_pages: int, page_size: int) -> tuple[memoryview, int]:
    mv = memoryview(payload).cast("B")
    want = normal_pages * page_size
    if mv.nbytes > MAX_PAYLOAD:
        raise PayloadError(f"qatzip: received unexpectedly large packet: {mv.nbytes} bytes > {MAX_PAYLOAD}")
    if want == 0 and mv.nbytes:
        raise PayloadError(f"qatzip: {mv.nbytes} payload bytes for a packet without normal pages")
    if want and not mv.nbytes:
        raise PayloadError(f"qatzip: empty payload for {normal_pages} normal pages")
    return mv, want


class _CpuRecv(Decompressor):
    """Any sequence of gzip members, inflated by ISA-L with bounded output and checked CRCs."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        mv, want = _check_size(payload, normal_pages, self.page_size)
        return decode_members(mv, want)


def _parse_header(mv: memoryview, pos: int, index: int) -> tuple[int, tuple[int, int] | None]:
    """Offset of member ``index``'s deflate data and its QZ (src_sz, dest_sz), if it has them."""
    n = mv.nbytes
    where = f"member {index} at byte {pos}"
    if n - pos < 10:
        raise PayloadError(f"qatzip: {where}: truncated gzip header ({n - pos} bytes left, need 10)")
    if bytes(mv[pos : pos + 2]) != _GZIP_ID:
        raise PayloadError(f"qatzip: {where}: gzip magic is {bytes(mv[pos:pos + 2]).hex()}, expected 1f8b")
    cm, flg = mv[pos + 2], mv[pos + 3]
    if cm != 8:
        raise PayloadError(f"qatzip: {where}: compression method {cm}, expected 8 (deflate)")
    if flg & 0xE0:
        raise PayloadError(f"qatzip: {where}: reserved gzip flag bits set (FLG 0x{flg:02x})")
    p = pos + 10
    qz: tuple[int, int] | None = None
    if flg & _FEXTRA:
        if n - p < 2:
            raise PayloadError(f"qatzip: {where}: truncated FEXTRA length")
        xlen = int.from_bytes(mv[p : p + 2], "little")
        p += 2
        if n - p < xlen:
            raise PayloadError(f"qatzip: {where}: FEXTRA of {xlen} bytes runs past the payload")
        q, end = p, p + xlen
        while end - q >= 4:
            si = bytes(mv[q : q + 2])
            ln = int.from_bytes(mv[q + 2 : q + 4], "little")
            if end - q - 4 < ln:
                raise PayloadError(f"qatzip: {where}: extra subfield {si!r} of {ln} bytes overruns FEXTRA")
            if si == b"QZ":
                if ln != 8:
                    raise PayloadError(f"qatzip: {where}: QZ extra subfield length {ln}, expected 8")
                qz = (int.from_bytes(mv[q + 4 : q + 8], "little"), int.from_bytes(mv[q + 8 : q + 12], "little"))
            q += 4 + ln
        if q != end:
            raise PayloadError(f"qatzip: {where}: {end - q} stray bytes at the end of FEXTRA")
        p = end
    for flag, name in ((_FNAME, "FNAME"), (_FCOMMENT, "FCOMMENT")):
        if flg & flag:
            zero = bytes(mv[p:]).find(b"\0")
            if zero < 0:
                raise PayloadError(f"qatzip: {where}: unterminated {name}")
            p += zero + 1
    if flg & _FHCRC:
        p += 2
    if p > n:
        raise PayloadError(f"qatzip: {where}: truncated gzip header")
    return p, qz


def decode_members(mv: memoryview, want: int) -> bytes:
    """Inflate the gzip members in ``mv`` into exactly ``want`` bytes, or raise PayloadError."""
    n = mv.nbytes
    pieces: list[bytes] = []
    produced = 0
    pos = 0
    index = 0
    while pos < n:
        room = want - produced
        if room == 0:
            raise PayloadError(f"qatzip: {n - pos} bytes after the {want} expected output bytes (member {index})")
        start, qz = _parse_header(mv, pos, index)
        where = f"member {index} at byte {pos}"
        if qz is not None:
            src_sz, dest_sz = qz
            if src_sz > room:
                raise PayloadError(
                    f"qatzip: {where}: QZ src_sz {src_sz} exceeds the {room} bytes left of the packet's {want}"
                )
            if dest_sz > n - start - TRAILER.size:
                raise PayloadError(f"qatzip: {where}: QZ dest_sz {dest_sz} runs past the payload ({n} bytes)")
            feed = mv[start : start + dest_sz]
        else:
            feed = mv[start:]
        d = isal_zlib.decompressobj(-15)
        # the output limit is the QZ src_sz when there is one (checked <= room above), so the
        # inflater's output buffer is sized to the member, not to the rest of the packet
        limit = room if qz is None else qz[0]
        try:
            piece = d.decompress(feed, limit)
            if not d.eof and d.unconsumed_tail:
                # output is full: only the end-of-block code may remain
                extra = d.decompress(d.unconsumed_tail, 1)
                if extra or not d.eof:
                    what = f"its QZ src_sz {limit}" if qz else f"the {room} bytes left of the packet's {want}"
                    raise PayloadError(f"qatzip: {where}: inflates to more than {what}")
        except INFLATE_ERRORS as exc:
            raise PayloadError(f"qatzip: {where}: inflate failed: {exc}") from exc
        if not d.eof:
            raise PayloadError(f"qatzip: {where}: truncated deflate data (inflated {len(piece)} bytes)")
        if qz is not None:
            if d.unused_data:
                raise PayloadError(
                    f"qatzip: {where}: QZ dest_sz {qz[1]} is larger than the deflate data "
                    f"({qz[1] - len(d.unused_data)} bytes)"
                )
            if len(piece) != qz[0]:
                raise PayloadError(f"qatzip: {where}: QZ src_sz {qz[0]} but the member inflates to {len(piece)}")
            tpos = start + qz[1]
        else:
            tpos = n - len(d.unused_data)
        if n - tpos < TRAILER.size:
            raise PayloadError(f"qatzip: {where}: truncated gzip trailer ({n - tpos} bytes, need 8)")
        crc, isize = TRAILER.unpack_from(mv, tpos)
        actual = isal_zlib.crc32(piece)
        if crc != actual:
            raise PayloadError(f"qatzip: {where}: CRC32 0x{crc:08x} in trailer, data has 0x{actual:08x}")
        if isize != len(piece) & 0xFFFFFFFF:
            raise PayloadError(f"qatzip: {where}: ISIZE {isize} in trailer, member inflates to {len(piece)}")
        pieces.append(piece)
        produced += len(piece)
        pos = tpos + TRAILER.size
        index += 1
    if produced != want:
        raise PayloadError(f"qatzip: packet size received {produced} size expected {want}")
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _HwRecv(Decompressor):
    """libqatzip on a QAT device: qzDecompress with exact input and output lengths."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        try:
            self.sess = libqatzip.QzSession(1, direction=libqatzip.QZ_DIR_DECOMPRESS)
        except libqatzip.QatzipError as exc:
            raise MethodUnavailable(f"qatzip: [receiver] {exc}") from exc

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        mv, want = _check_size(payload, normal_pages, self.page_size)
        if not want:
            return b""
        if not all_qz_members(mv):
            # plain gzip: QAT hardware would hand it to software anyway; ours checks more
            return decode_members(mv, want)
        try:
            out = self.sess.decompress(mv.tobytes(), want)
        except libqatzip.QatzipError as exc:
            raise PayloadError(f"qatzip: qzDecompress failed: {exc}") from exc
        # QATzip does not check gzip trailers (a payload cut inside the last trailer decodes with
        # QZ_OK and leaves the session waiting for the rest): check every member's sizes, CRC32 and
        # ISIZE against what it produced, and start a new session after any failure
        try:
            check_members(mv, out)
        except PayloadError:
            self.sess.reset()
            raise
        return out


def all_qz_members(mv: memoryview) -> bool:
    """True when every member header in ``mv`` carries a QZ subfield (members located by dest_sz)."""
    pos, n, index = 0, mv.nbytes, 0
    while pos < n:
        start, qz = _parse_header(mv, pos, index)
        if qz is None:
            return False
        pos = start + qz[1] + TRAILER.size
        index += 1
    return True


def check_members(mv: memoryview, out: bytes) -> None:
    """Check QZ members' src_sz, dest_sz, CRC32 and ISIZE against ``out``, their inflated bytes."""
    pos, n, produced, index = 0, mv.nbytes, 0, 0
    while pos < n:
        start, qz = _parse_header(mv, pos, index)
        where = f"member {index} at byte {pos}"
        if qz is None:
            raise PayloadError(f"qatzip: {where}: no QZ extra field")
        src_sz, dest_sz = qz
        tpos = start + dest_sz
        if n - tpos < TRAILER.size:
            raise PayloadError(f"qatzip: {where}: QZ dest_sz {dest_sz} leaves no room for the gzip trailer")
        if src_sz > len(out) - produced:
            raise PayloadError(f"qatzip: {where}: QZ src_sz {src_sz} exceeds the output left ({len(out) - produced})")
        crc, isize = TRAILER.unpack_from(mv, tpos)
        piece = memoryview(out)[produced : produced + src_sz]
        actual = isal_zlib.crc32(piece)
        if crc != actual or isize != src_sz & 0xFFFFFFFF:
            raise PayloadError(
                f"qatzip: {where}: trailer CRC32 0x{crc:08x} ISIZE {isize}, data has 0x{actual:08x} and {src_sz} bytes"
            )
        produced += src_sz
        pos = tpos + TRAILER.size
        index += 1
    if produced != len(out):
        raise PayloadError(f"qatzip: members' QZ src_sz add up to {produced}, output is {len(out)}")


def backend_mode() -> str:
    """``LIVEMIG_QATZIP``: ``auto`` (default: libqatzip if it reports a QAT device, else the CPU path),
    ``cpu`` (never probe libqatzip) or ``lib`` (always libqatzip, in its zlib software mode when
    there is no device: slow, for testing the library path)."""
    mode = os.environ.get("LIVEMIG_QATZIP", "auto").lower() or "auto"
    if mode not in ("auto", "cpu", "lib"):
        raise ParameterError(f"LIVEMIG_QATZIP is '{mode}', expected auto, cpu or lib")
    return mode


def hardware_probe() -> libqatzip.Probe:
    """What libqatzip reports on this host (not probed when ``LIVEMIG_QATZIP=cpu``)."""
    if backend_mode() == "cpu":
        return libqatzip.Probe(False, False, "LIVEMIG_QATZIP=cpu: libqatzip not probed")
    return libqatzip.probe()


class Qatzip(Method):
    name = "qatzip"
    flag = FLAG_QATZIP
    levels = (1, 9)

    def __init__(self, level: int = 1, page_size: int = PAGE_SIZE) -> None:
        if level not in LEVEL_MAP:
            raise ParameterError("Parameter 'multifd_qatzip_level' expects a value between 1 and 9")
        super().__init__(level, page_size)
        self._probe = hardware_probe()
        self._use_lib = self._probe.hardware
        if backend_mode() == "lib":
            if not self._probe.loaded:
                raise MethodUnavailable(f"qatzip: LIVEMIG_QATZIP=lib but {self._probe.detail}")
            self._use_lib = True

    def accelerated(self) -> bool:
        return self._probe.hardware

    def backend(self) -> str:
        if self._probe.hardware:
            return f"hardware: QAT via {libqatzip.library_label()}"
        if self._use_lib:
            return f"cpu: {libqatzip.library_label()} software mode (zlib; LIVEMIG_QATZIP=lib, no QAT device)"
        engine, elevel = LEVEL_MAP[self.level]
        what = f"ISA-L {isal.__version__} deflate level {elevel}" if engine == "isal" else (
            f"zlib {zlib.ZLIB_RUNTIME_VERSION} deflate level {elevel}"
        )
        return f"cpu: {what}, same wire format (no QAT device: {self._probe.detail})"

    def compressor(self, channel: int) -> Compressor:
        if self._use_lib:
            return _HwSend(self.level)
        return _CpuSend(self.level)

    def decompressor(self, channel: int) -> Decompressor:
        if self._use_lib:
            return _HwRecv(self.page_size)
        return _CpuRecv(self.page_size)


METHOD = Qatzip
