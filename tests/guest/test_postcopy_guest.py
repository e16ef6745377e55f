"""Guests on a post-copy destination: RAM registered with userfaultfd in missing mode, pages placed
by a serving thread, and no Python access to RAM that could fault while holding the GIL."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from livemig.guest.base import RamBlock
from livemig.guest.uffd import Userfaultfd, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")
PAGE = 4096


def test_ensure_pages_faults_in_only_missing_pages() -> None:
    block = RamBlock("t", 32 * PAGE)
    src = np.random.default_rng(1).integers(0, 256, (32, PAGE), dtype=np.uint8)
    block.pages[:] = src
    block.ensure_pages(np.arange(32))  # present is None: nothing to do, nothing registered
    block.discard(4, 20)
    present = np.ones(32, dtype=bool)
    present[4:24] = False
    block.present = present
    uffd = Userfaultfd()
    uffd.register(block.address, block.size)
    seen: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for addr in uffd.read_faults(0.05):
                page = (addr - block.address) // PAGE
                seen.append(page)
                uffd.copy(block.address + page * PAGE, src.ctypes.data + page * PAGE, PAGE)
                present[page] = True

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert not block.pages_present(np.array([0, 5])) and block.pages_present(np.array([0, 30]))
        block.ensure_pages(np.array([[7, 0], [9, 8]]))  # any shape; 0 is present
        block.ensure_range(20, 6)
        block.ensure_bytes(11 * PAGE + 100, PAGE)  # pages 11 and 12
        block.ensure_pages(np.array([7, 9]))  # present now: no fault
        assert sorted(seen) == [7, 8, 9, 11, 12, 20, 21, 22, 23]
        assert (block.pages[[7, 8, 9, 11, 12, 20, 23]] == src[[7, 8, 9, 11, 12, 20, 23]]).all()
    finally:
        stop.set()
        t.join(timeout=5)
        uffd.close()
        block.close()
