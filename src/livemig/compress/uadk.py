"""``uadk``: per-page zlib streams behind a BE u32 length table (docs/wire.md, "Payloads").

Wire format (see :mod:`.pagetable`): ``len[i]`` u32 big-endian for each normal page, then the pages'
data; a compressed page is one zlib stream (RFC 1950) of the page, ``len == page_size`` means raw.
No level parameter.

Sender, CPU path: the bytes HiSilicon's ZIP engine writes: the fixed header ``78 9c``, raw deflate
(ISA-L level 1, history window 4 KiB, as QEMU's "4K window size" comment asks; the header nominally
claims 32 KiB, which any decoder accepts), then the adler32 of the page, big-endian. A page that does
not shrink is sent raw.

Receiver: checks each zlib header (CM 8, window <= 32 KiB, FCHECK, no preset dictionary), inflates
with the output bounded to one page and checks the adler32 trailer; raw pages are copied.

Interoperability with QEMU, which has no software path for UADK:

* A QEMU *sender* without UADK hardware sends every page raw (``len == page_size``, after the
  warning "UADK hardware not available. Switch to no compression mode"). livemig decodes that: it is
  a valid table payload with no compressed pages.
* A QEMU *receiver* without UADK hardware fails the migration on the first compressed page ("UADK HW
  not available for decompression"). It never writes wrong RAM, but the migration does not complete.
  Toward such a receiver set ``LIVEMIG_UADK=raw`` on the sender: livemig then sends every page raw,
  exactly as QEMU does without hardware (no compression, but safe and interoperable).
* UADK's own documentation warns that it is "not fully compatible with ZLIB"; the streams written
  here are standard zlib, which our receiver and any zlib decoder accept.

``libwd``/``libwd_comp`` with a uacce device is *detected* (``livemig accel``) but not driven: no UADK
build exists for this host (UADK is for arm64 Kunpeng; no Debian package), so a binding could not be
verified. The CPU path runs instead, and the backend string says so.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

try:
    import isal
    from isal import igzip_lib, isal_zlib
except ImportError as exc:  # a dependency in pyproject.toml; say what to install if it is missing
    raise ImportError(f"{exc}: install the isal package (pip install isal, or apt-get install python3-isal)") from exc

from .._types import Buffer
from ..errors import PayloadError
from ..wire.constants import FLAG_UADK, PAGE_SIZE
from . import pagetable
from .base import Compressor, Decompressor, Method

#: the zlib header HiSilicon's ZIP engine writes (deflate, 32 KiB window claimed, default level)
ZLIB_HEADER = b"\x78\x9c"
HIST_BITS = 12
ISAL_LEVEL = 1
_ADLER = struct.Struct(">I")


def compress_page(page: memoryview) -> bytes:
    """One page as a zlib stream: ``78 9c`` + raw deflate (4 KiB window) + adler32 (BE).

    The page is copied first: the guest may write it meanwhile, and the deflate data and the adler32
    must describe the same bytes."""
    snap = bytes(page)
    body: bytes = igzip_lib.compress(snap, ISAL_LEVEL, igzip_lib.COMP_DEFLATE, 0, HIST_BITS)
    return ZLIB_HEADER + body + _ADLER.pack(isal_zlib.adler32(snap))


def decompress_page(data: memoryview, page_size: int) -> bytes:
    """One page from a zlib stream, output bounded; PayloadError on a bad header, stream or adler32."""
    if data.nbytes < 2 + 2 + 4:
        raise PayloadError(f"zlib stream of {data.nbytes} bytes is too short")
    cmf, flg = data[0], data[1]
    if cmf & 0x0F != 8 or cmf >> 4 > 7:
        raise PayloadError(f"zlib header CMF 0x{cmf:02x}, expected deflate with a window <= 32 KiB")
    if (cmf << 8 | flg) % 31:
        raise PayloadError(f"zlib header 0x{cmf:02x}{flg:02x} fails its FCHECK")
    if flg & 0x20:
        raise PayloadError("zlib header asks for a preset dictionary (FDICT)")
    page = pagetable.inflate_raw(data[2:-4], page_size)
    (want,) = _ADLER.unpack_from(data, data.nbytes - 4)
    got = isal_zlib.adler32(page)
    if want != got:
        raise PayloadError(f"adler32 0x{want:08x} in the trailer, data has 0x{got:08x}")
    return page


def _raw_page(page: memoryview) -> None:
    return None


class _Send(Compressor):
    def __init__(self, page_size: int, raw: bool) -> None:
        self.page_size = page_size
        self.raw = raw

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        return pagetable.encode(runs, self.page_size, _raw_page if self.raw else compress_page)


class _Recv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def _page(self, data: memoryview) -> bytes:
        return decompress_page(data, self.page_size)

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        return pagetable.decode("uadk", payload, normal_pages, self.page_size, self._page)


def hardware_note() -> str | None:
    """Why a UADK device is not used, if one is present."""
    from ..accel.inventory import _try_load, scan_uacce

    devs = [d for d in scan_uacce() if "zlib" in d.algorithms or "deflate" in d.algorithms]
    if not devs:
        return None
    lib = _try_load("libwd_comp.so", ["libwd_comp.so.2", "libwd_comp.so"])
    names = ", ".join(d.name for d in devs)
    if not lib.loads:
        return f"uacce device(s) {names} found but libwd_comp does not load ({lib.detail}): install UADK"
    return f"uacce device(s) {names} and libwd_comp found; livemig has no verified UADK binding"


def send_raw() -> bool:
    """True when ``LIVEMIG_UADK=raw``: send every page uncompressed, as QEMU does without hardware."""
    return os.environ.get("LIVEMIG_UADK", "").lower() == "raw"


class Uadk(Method):
    name = "uadk"
    flag = FLAG_UADK
    levels = None

    def __init__(self, level: int = 1, page_size: int = PAGE_SIZE) -> None:
        super().__init__(level, page_size)
        self._note = hardware_note()
        self._raw = send_raw()

    def backend(self) -> str:
        why = self._note or "no UADK device"
        if self._raw:
            return f"cpu: pages sent raw (LIVEMIG_UADK=raw, as QEMU without UADK hardware); {why}"
        return f"cpu: ISA-L {isal.__version__} zlib per page, 4 KiB window, same wire format as UADK ({why})"

    def compressor(self, channel: int) -> Compressor:
        return _Send(self.page_size, self._raw)

    def decompressor(self, channel: int) -> Decompressor:
        return _Recv(self.page_size)


METHOD = Uadk
