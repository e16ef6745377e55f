"""Dirty bitmaps kept by the host: the layout of KVM's dirty log, one bit per page.

A bitmap of ``npages`` pages is a uint64 array of shape (ceil(npages / 64),); bit ``i`` of word
``w`` is page ``64 * w + i`` (docs/kvm.md, "Dirty log"). Both guests keep their host-side logs in
it, so one function, :func:`livemig.ram.pages.bitmap_to_pages`, turns either into page indices.
"""

from __future__ import annotations

import numpy as np


def new_bitmap(npages: int) -> np.ndarray:
    """An all-clear bitmap for ``npages`` pages: uint64 zeros of shape (ceil(npages / 64),)."""
    return np.zeros(-(-npages // 64), dtype=np.uint64)


def set_page_bits(bitmap: np.ndarray, pages: np.ndarray) -> None:
    """Set the bits of ``pages`` (int64 indices, any order, repeats allowed) in ``bitmap``.

    The caller checks the range and serialises writers of one bitmap.
    """
    idx = np.asarray(pages, dtype=np.int64)
    np.bitwise_or.at(bitmap, idx >> 6, np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64)))
