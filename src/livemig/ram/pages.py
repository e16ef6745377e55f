"""Page index arithmetic, vectorised: runs of contiguous pages, packets of one block."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive ascending page indices, in the array's order, as (first, count) pairs."""
    if idx.size == 0:
        return []
    first = int(idx[0])
    # the common case, one ascending contiguous run; the order check matters: a peer's offsets need
    # not be sorted (QEMU moves zero pages to the end of the list by swapping)
    if int(idx[-1]) - first + 1 == idx.size and bool(np.all(idx[1:] > idx[:-1])):
        return [(first, int(idx.size))]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    firsts = idx[starts]
    return [(int(f), int(n)) for f, n in zip(firsts, ends - starts, strict=True)]


def chunks(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split an index array into consecutive pieces of at most ``size`` entries (views, no copy)."""
    for start in range(0, idx.size, size):
        yield idx[start : start + size]
