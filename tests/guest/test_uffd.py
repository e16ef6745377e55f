"""userfaultfd on a RAM block: faults from a GIL-free touch are served by a thread placing pages."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from livemig.guest.base import RamBlock
from livemig.guest.uffd import Userfaultfd, touch, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")
PAGE = 4096


def serve(uffd: Userfaultfd, block: RamBlock, src: np.ndarray, stop: threading.Event, seen: list[int]) -> None:
    """Place each faulted page: page 3 as a zero page, the others from ``src``."""
    while not stop.is_set():
        for addr in uffd.read_faults(0.05):
            page = (addr - block.address) // PAGE
            seen.append(page)
            dst = block.address + page * PAGE
            if page == 3:
                uffd.zeropage(dst, PAGE)
            else:
                uffd.copy(dst, src.ctypes.data + page * PAGE, PAGE)


def test_missing_pages_fault_and_are_placed() -> None:
    block = RamBlock("t", 16 * PAGE)
    block.pages[:] = 7  # every page present ...
    block.discard(2, 14)  # ... until pages 2..15 are freed
    # read through the file: touching the mapping would allocate the pages again
    assert os.pread(block.fd, PAGE, 2 * PAGE) == bytes(PAGE) and block.pages[0, 0] == 7
    src = np.arange(16 * PAGE, dtype=np.uint64).astype(np.uint8)
    uffd = Userfaultfd()
    uffd.register(block.address, block.size)
    stop, seen = threading.Event(), []
    t = threading.Thread(target=serve, args=(uffd, block, src, stop, seen), daemon=True)
    t.start()
    try:
        touch(block.address, 4 * PAGE)  # pages 0,1 present; 2 copied; 3 zero
        assert sorted(seen) == [2, 3]
        assert (block.pages[2] == src[2 * PAGE:3 * PAGE]).all()
        assert block.pages[3].max() == 0
        assert not uffd.copy(block.address + 2 * PAGE, src.ctypes.data, PAGE)  # already there
        assert uffd.copy(block.address + 8 * PAGE, src.ctypes.data + 8 * PAGE, 4 * PAGE)  # placed ahead
        touch(block.address + 8 * PAGE, 4 * PAGE)
        assert sorted(seen) == [2, 3]  # no fault for pages placed before their touch
        assert (block.pages[8:12].reshape(-1) == src[8 * PAGE:12 * PAGE]).all()
    finally:
        stop.set()
        t.join()
        uffd.close()
        block.close()
