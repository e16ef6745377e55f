"""Page-set arithmetic, vectorised: the one home of functions over arrays of page indices.

A page set is a 1-D ``int64`` array of page indices into one RAM block (index = offset / page size),
usually sorted ascending; a block's RAM as pages is a ``(npages, page_size)`` ``uint8`` array, or its
``uint64`` view ``(npages, page_size // 8)`` for fast scans.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def bitmap_to_pages(words: np.ndarray, npages: int) -> np.ndarray:
    """Page indices of the set bits of a dirty bitmap, sorted ascending.

    ``words``: shape (ceil(npages / 64),) or longer, uint64, in KVM's dirty-log bit order (bit ``i``
    of word ``w`` is page ``64 * w + i``; docs/kvm.md, "Dirty log"). Returns an int64 array of shape
    (number of set bits below ``npages``,); bits at ``npages`` and above are ignored. A dense
    bitmap is unpacked whole (~0.5 ms for 1 GiB of 4 KiB pages), a sparse one only in its non-zero
    words; no Python loop over pages. ValueError if ``words`` is not a 1-D uint64 array.
    """
    if words.dtype != np.uint64 or words.ndim != 1:
        raise ValueError(f"dirty bitmap: expected a 1-D uint64 array, got {words.ndim}-D {words.dtype}")
    words = np.ascontiguousarray(words, dtype="<u8")  # a no-op on little-endian hosts
    nonzero = np.flatnonzero(words)
    if nonzero.size == 0:
        return np.empty(0, dtype=np.int64)
    if nonzero.size * 8 > words.size:
        pages: np.ndarray = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
    else:
        bits = np.flatnonzero(np.unpackbits(words[nonzero].view(np.uint8), bitorder="little"))
        pages = nonzero[bits >> 6] * 64 + (bits & 63)
    pages = pages.astype(np.int64, copy=False)
    if pages[-1] >= npages:
        pages = pages[pages < npages]
    return pages


def runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive ascending page indices, in the array's order, as (first, count) pairs.

    ``idx``: 1-D integer array, any order (a peer's offsets need not be sorted).
    """
    if idx.size == 0:
        return []
    first = int(idx[0])
    # the common case, one ascending contiguous run; the order check matters: a peer's offsets need
    # not be sorted (QEMU moves zero pages to the end of the list by swapping)
    if int(idx[-1]) - first + 1 == idx.size and bool(np.all(idx[1:] > idx[:-1])):
        return [(first, int(idx.size))]
    cuts = (np.flatnonzero(idx[1:] - idx[:-1] != 1) + 1).tolist()
    starts, ends = [0, *cuts], [*cuts, int(idx.size)]
    firsts = idx[starts].tolist()
    return [(f, e - s) for f, s, e in zip(firsts, starts, ends, strict=True)]


def chunks(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split an index array into consecutive pieces of at most ``size`` entries (views, no copy)."""
    for start in range(0, idx.size, size):
        yield idx[start : start + size]


def merge_pages(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted 1-D page index arrays (``int64``); returns one of them when the
    other is empty (no copy)."""
    if not a.size:
        return b
    if not b.size:
        return a
    return unique_pages(np.concatenate((a, b)))


def unique_pages(idx: np.ndarray) -> np.ndarray:
    """Sorted distinct values of the 1-D int64 array ``idx``. Sort-based on purpose: numpy 2.3+'s
    ``np.unique`` without ``return_counts`` is hash-based and ~40x slower on 100k pages (110 ms, in
    the downtime when the final sync merges with a large pending set)."""
    out = np.sort(idx)
    if out.size < 2:
        return out
    keep = np.empty(out.size, dtype=bool)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


def warm_numpy() -> None:
    """numpy loads some functions (its sort among them) lazily: ~20 ms on first call. Pay that before
    the guest is paused, not during downtime."""
    merge_pages(np.arange(2), np.arange(1, 3))


def nonzero_pages(pages64: np.ndarray) -> np.ndarray:
    """Which pages hold a non-zero byte.

    ``pages64``: ``(n, page_size // 8)`` ``uint64`` rows, one per page (a block's ``pages`` viewed as
    ``uint64``). Returns ``(n,)`` ``bool``, True where any byte of the page is non-zero.

    Like QEMU's buffer_is_zero, it looks at the cheap part first: a page whose first 8 bytes are not
    all zero is non-zero without reading more (one column of the rows: the usual data page); of the
    others, those whose first 64 bytes are not all zero are non-zero; only the rest are scanned
    whole, gathered (all of them at once, with no gather and no 64-byte step, when no page has a
    non-zero first word: most likely a zero chunk).
    """
    nonzero: np.ndarray = pages64[:, 0] != 0
    rest = np.flatnonzero(~nonzero)
    if rest.size == nonzero.size:
        nonzero[:] = np.bitwise_or.reduce(pages64, axis=1) != 0
    elif rest.size:
        head = np.bitwise_or.reduce(pages64[rest, 1:8], axis=1) != 0
        nonzero[rest] = head
        rest = rest[~head]
        if rest.size:
            nonzero[rest] = np.bitwise_or.reduce(pages64[rest], axis=1) != 0
    return nonzero
