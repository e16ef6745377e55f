"""Page index arithmetic, vectorised: runs of contiguous pages, packets of one block."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of a sorted page index array as (first, count) pairs."""
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    firsts = idx[starts]
    return [(int(f), int(n)) for f, n in zip(firsts, ends - starts, strict=True)]


def chunks(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Split an index array into consecutive pieces of at most ``size`` entries (views, no copy)."""
    for start in range(0, idx.size, size):
        yield idx[start : start + size]
