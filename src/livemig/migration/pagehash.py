"""Post-copy's verification: one xxh3-64 per page of the content each side holds at the switch
(docs/postcopy.md, "Verification").

Precopy compares chunk digests of RAM at the commit point; post-copy cannot, since the destination's
guest writes its RAM as soon as it runs. Instead both sides keep one hash per page of the content
that *lands*: the destination hashes every page as it lands (a multifd packet, a page on the main
stream, a page placed with UFFDIO_COPY; a zero page is :data:`zero_hash`), the source hashes its
RAM frozen at the switch. A block's digest is the xxh3-128 of its array of hashes; equal digests
mean the destination's guest started from exactly the source's RAM.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

if TYPE_CHECKING:
    from ..guest import Guest

#: the algorithm name carried in post-copy's livemig/digest section
ALGORITHM = "xxh3-64-per-page"


def zero_hash(page_size: int) -> int:
    """The hash of a page of zeros."""
    return int(xxhash.xxh3_64_intdigest(bytes(page_size)))


class PageHashes:
    """block name -> ``uint64`` array of per-page hashes. Writers of different pages may run in
    different threads (each element is written by one)."""

    def __init__(self, blocks: dict[str, int], page_size: int) -> None:
        self.page_size = page_size
        self.zero = zero_hash(page_size)
        self.arrays = {name: np.full(n, self.zero, dtype=np.uint64) for name, n in blocks.items()}

    @classmethod
    def of_guest(cls, guest: Guest) -> PageHashes:
        """Hashes of every page of a *stopped* guest's RAM (the source, at the switch)."""
        out = cls({b.name: b.npages for b in guest.blocks}, guest.page_size)
        for b in guest.blocks:
            out.landed(b.name, b.pages, np.arange(b.npages), np.empty(0, dtype=np.int64))
        return out

    def landed(self, block: str, pages: np.ndarray, normal: np.ndarray, zero: np.ndarray) -> None:
        """Pages ``normal`` of ``pages`` (a block's ``(npages, page_size)`` view; must be present)
        and the zero pages ``zero`` have landed."""
        arr = self.arrays[block]
        h = xxhash.xxh3_64_intdigest
        for p in normal.tolist():
            arr[p] = h(pages[p])
        if zero.size:
            arr[zero] = self.zero

    def put(self, block: str, page: int, data: Any | None) -> None:
        """One page landed with content ``data`` (None: a zero page)."""
        self.arrays[block][page] = self.zero if data is None else xxhash.xxh3_64_intdigest(data)

    def digests(self) -> dict[str, Any]:
        """``{"algorithm": ALGORITHM, "blocks": {name: hex xxh3-128 of the hash array}}``."""
        return {"algorithm": ALGORITHM,
                "blocks": {n: xxhash.xxh3_128_hexdigest(a.tobytes()) for n, a in self.arrays.items()}}


class Background:
    """:meth:`PageHashes.of_guest` in a thread (the source hashes while it sends pages)."""

    def __init__(self, guest: Guest) -> None:
        self._out: PageHashes | None = None
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(guest,), name="postcopy-hash", daemon=True)
        self._t.start()

    def _run(self, guest: Guest) -> None:
        try:
            self._out = PageHashes.of_guest(guest)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def result(self) -> PageHashes:
        self._t.join()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out
