"""Page-set functions: the sort-based union and distinct values equal Python's set arithmetic."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from livemig.ram.pages import merge_pages, unique_pages

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
