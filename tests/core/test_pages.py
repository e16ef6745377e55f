"""Page-set functions: the sort-based union and distinct values equal Python's set arithmetic; zero-page
detection equals a byte-by-byte test."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from livemig.ram.pages import merge_pages, nonzero_pages, unique_pages

pages = st.lists(st.integers(min_value=0, max_value=5000), max_size=300)


@given(pages)
def test_unique_pages_is_sorted_distinct(values: list[int]) -> None:
    out = unique_pages(np.array(values, dtype=np.int64))
    assert out.dtype == np.int64 and out.tolist() == sorted(set(values))


@given(pages, pages)
def test_merge_pages_is_the_sorted_union(a: list[int], b: list[int]) -> None:
    sa = np.array(sorted(set(a)), dtype=np.int64)
    sb = np.array(sorted(set(b)), dtype=np.int64)
    assert merge_pages(sa, sb).tolist() == sorted(set(a) | set(b))


#: a byte of a page: in its first word, in the rest of its first 64 bytes, or after them
_byte = st.one_of(st.integers(0, 7), st.integers(8, 63), st.integers(64, 4095))


@given(st.integers(0, 40), st.lists(st.tuples(st.integers(0, 39), _byte, st.integers(1, 255)), max_size=60),
       st.booleans())
def test_nonzero_pages_is_any_byte_set(n: int, writes: list[tuple[int, int, int]], gathered: bool) -> None:
    """A page is non-zero iff one of its bytes is: whichever word holds it (the first, the first 64
    bytes, the last), for a block's rows viewed as uint64 or a gathered copy of them."""
    ram = np.zeros((n, 4096), dtype=np.uint8)
    for page, byte, value in writes:
        if page < n:
            ram[page, byte] = value
    rows = ram.view(np.uint64)
    if gathered:
        rows = rows[np.arange(n)[::-1]]
        ram = ram[::-1]
    assert nonzero_pages(rows).tolist() == [bool(page.any()) for page in ram]


def test_nonzero_pages_of_block_views() -> None:
    """Rows of a mapped block (a slice of its uint64 view): each kind of page in one call."""
    block = np.zeros((200, 4096), dtype=np.uint8)
    block[10, 0] = block[11, 9] = block[12, 63] = block[13, 64] = block[14, 4095] = 1
    got = nonzero_pages(block.view(np.uint64)[8:16])
    assert got.tolist() == [False, False, True, True, True, True, True, False]
    assert not nonzero_pages(block.view(np.uint64)[100:]).any()
