"""Dirty bitmaps in KVM's layout: setting page bits and turning words back into page indices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.guest.bitmap import new_bitmap, set_page_bits
from livemig.ram.pages import bitmap_to_pages


def _packed(bits: np.ndarray) -> np.ndarray:
    """An independent encoder: numpy's packbits, little bit order, bytes viewed as uint64 words."""
    padded = np.zeros(-(-bits.size // 64) * 64, dtype=bool)
    padded[: bits.size] = bits
    return np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)


@given(st.integers(1, 3000).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=400))))
def test_set_bits_then_pages_is_sorted_unique(case: tuple[int, list[int]]) -> None:
    npages, pages = case
    bm = new_bitmap(npages)
    assert bm.shape == (-(-npages // 64),) and bm.dtype == np.uint64
    set_page_bits(bm, np.array(pages, dtype=np.int64))
    got = bitmap_to_pages(bm, npages)
    assert got.dtype == np.int64
    assert got.tolist() == sorted(set(pages))


@given(st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_pages_match_an_independent_encoding(npages: int, density: float, seed: int) -> None:
    # densities span both paths: a sparse map is unpacked word by word, a dense one whole
    bits = np.random.default_rng(seed).random(npages) < density
    got = bitmap_to_pages(_packed(bits), npages)
    assert np.array_equal(got, np.flatnonzero(bits))


def test_bits_at_and_above_npages_are_ignored() -> None:
    bm = np.array([0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)
    assert bitmap_to_pages(bm, 70).tolist() == list(range(70))
    sparse = np.zeros(100, dtype=np.uint64)
    sparse[0] = 1 << 63
    sparse[1] = 0b101
    assert bitmap_to_pages(sparse, 65).tolist() == [63, 64]


def test_kvm_bit_order() -> None:
    # bit i of word w is page 64 w + i (KVM_GET_DIRTY_LOG's layout)
    bm = np.zeros(3, dtype=np.uint64)
    bm[2] = np.uint64(1 << 5)
    assert bitmap_to_pages(bm, 192).tolist() == [133]


def test_rejects_a_byte_map() -> None:
    with pytest.raises(ValueError, match="expected a 1-D uint64 array, got 1-D uint8"):
        bitmap_to_pages(np.ones(8, dtype=np.uint8), 8)
