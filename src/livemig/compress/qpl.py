"""``qpl``: per-page raw deflate with a 4 KiB window behind a BE u32 length table (docs/wire.md, "Payloads").

Wire format (see :mod:`.pagetable`): ``len[i]`` u32 big-endian for each normal page, then the pages'
data; a page whose raw deflate (RFC 1951, history window 4 KiB, one final block) is not shorter than
the page is sent raw with ``len == page_size``. QEMU's QPL sender limits the job's output to
``page_size - 1`` bytes, which is the same rule. No level parameter.

Backend: the CPU path here is ISA-L level 1 with ``hist_bits=12`` (so no match reaches further back
than 4 KiB, which IAA hardware decompression requires: it fails with QPL_STS_BAD_DIST_ERR otherwise),
through the ``isal`` package, which releases the GIL. The receiver inflates each page with ISA-L into
its own page-sized slot, output bounded, with any window size (a larger window is harmless when
decoding).

Intel QPL's hardware path (``libqpl`` + an IAA work queue) is *detected* (``livemig accel`` lists
both) but not driven: QPL's ``qpl_job`` structure layout changes between QPL releases and no QPL
build loads on this Debian 12 host (Debian's libqpl1 needs glibc 2.38), so a ctypes job binding could
not be verified. When both are present the backend string says so and the CPU path runs; the wire
format is the same, so a QEMU peer using IAA decodes our pages and we decode its pages.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    import isal
    from isal import igzip_lib
except ImportError as exc:  # a dependency in pyproject.toml; say what to install if it is missing
    raise ImportError(f"{exc}: install the isal package (pip install isal, or apt-get install python3-isal)") from exc

from .._types import Buffer
from ..wire.constants import FLAG_QPL, PAGE_SIZE
from . import pagetable
from .base import Compressor, Decompressor, Method

#: QPL always compresses with a 4 KiB history window
HIST_BITS = 12
#: ISA-L level for the CPU path (QEMU runs QPL at its only level, 1)
ISAL_LEVEL = 1


def compress_page(page: memoryview) -> bytes:
    """Raw deflate of one page, window 4 KiB (may be longer than the page: the caller sends it raw).

    The page is copied first (4 KiB, cheap next to deflate): the guest may write it meanwhile, and a
    deflater must not see its input change under it."""
    out: bytes = igzip_lib.compress(bytes(page), ISAL_LEVEL, igzip_lib.COMP_DEFLATE, 0, HIST_BITS)
    return out


class _Send(Compressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        return pagetable.encode(runs, self.page_size, compress_page)


class _Recv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def _page(self, data: memoryview) -> bytes:
        return pagetable.inflate_raw(data, self.page_size)

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        return pagetable.decode("qpl", payload, normal_pages, self.page_size, self._page)


def hardware_note() -> str | None:
    """Why the IAA hardware path is not used, if libqpl loads and an IAA work queue is enabled."""
    from ..accel.inventory import _try_load, scan_iaa

    iaa, _ = scan_iaa()
    wqs = sum(1 for d in iaa for wq in d.work_queues if wq.get("state") == "enabled")
    if not wqs:
        return None
    lib = _try_load("libqpl.so.1", ["libqpl.so.1", "libqpl.so"])
    if not lib.loads:
        return f"{wqs} IAA work queue(s) found but libqpl does not load ({lib.detail}): install libqpl1"
    return f"{wqs} IAA work queue(s) and libqpl found; livemig has no verified QPL job binding"


class Qpl(Method):
    name = "qpl"
    flag = FLAG_QPL
    levels = None

    def __init__(self, level: int = 1, page_size: int = PAGE_SIZE) -> None:
        super().__init__(level, page_size)
        self._note = hardware_note()

    def backend(self) -> str:
        why = self._note or "no IAA device"
        return (
            f"cpu: ISA-L {isal.__version__} raw deflate per page, 4 KiB window, same wire format as IAA ({why})"
        )

    def compressor(self, channel: int) -> Compressor:
        return _Send(self.page_size)

    def decompressor(self, channel: int) -> Decompressor:
        return _Recv(self.page_size)


METHOD = Qpl
