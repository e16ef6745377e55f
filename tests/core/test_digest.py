"""Chunk digests: hashed once per chunk a packet covers whole, never a stale digest kept."""

from __future__ import annotations

import numpy as np

from livemig.ram.digest import ChunkDigest

PS = 4096
CP = 128  # pages per chunk = pages per multifd packet


def _fresh(buf: bytearray) -> str:
    """The digest of ``buf`` hashed from scratch."""
    return ChunkDigest(memoryview(buf)).digest(full=True)


def test_one_pass_of_whole_packets_hashes_each_chunk_once() -> None:
    nchunks = 9
    npages = nchunks * CP - 5  # a short tail chunk
    dst = bytearray(npages * PS)
    d = ChunkDigest(memoryview(dst))
    d.assume_zero()
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, npages * PS, dtype=np.uint8)
    src[3 * CP * PS : 4 * CP * PS] = 0  # chunk 3 arrives as zero pages only
    for c in rng.permutation(nchunks).tolist():  # packets land in any order
        pages = np.arange(c * CP, min(npages, (c + 1) * CP), dtype=np.int64)
        if c == 3:
            d.cover(pages[:0], pages, mark_rest=True)
            continue
        dst[pages[0] * PS : (pages[-1] + 1) * PS] = src[pages[0] * PS : (pages[-1] + 1) * PS].tobytes()
        d.cover(pages, pages[:0], mark_rest=True)
    assert d.hashed == nchunks - 1  # each once; the zero chunk not read at all
    assert d.refresh() == 0  # nothing left for switchover
    assert d.digest() == _fresh(bytearray(src.tobytes()))


def test_a_packet_covering_part_of_a_chunk_marks_it_for_later() -> None:
    buf = bytearray(2 * CP * PS)
    d = ChunkDigest(memoryview(buf))
    d.assume_zero()
    buf[5 * PS] = 7
    assert d.cover(np.array([5, 9], dtype=np.int64), np.array([6], dtype=np.int64), mark_rest=True) == 0
    assert d.dirty.tolist() == [True, False]
    assert d.digest() == _fresh(bytearray(buf)) and d.hashed == 1


def test_a_sender_leaves_partly_covered_chunks_as_the_dirty_log_marked_them() -> None:
    buf = bytearray(2 * CP * PS)
    d = ChunkDigest(memoryview(buf))
    d.refresh()
    d.cover(np.array([1, 2], dtype=np.int64), np.array([], dtype=np.int64), mark_rest=False)
    assert not d.dirty.any()


def test_a_background_hash_never_replaces_a_newer_digest() -> None:
    """A write and its cover() land while a refresh hashes the same chunk: the refresh's (stale)
    result is dropped, the final digest is the memory's."""
    buf = bytearray(CP * PS)
    mv = memoryview(buf)

    class Racing(ChunkDigest):
        raced = False

        def _hash(self, c: int) -> bytes:
            h = super()._hash(c)  # hashed before the write below: stale once it lands
            if not self.raced:
                self.raced = True
                buf[:PS] = b"\x01" * PS
                self.cover(np.arange(CP, dtype=np.int64), np.array([], dtype=np.int64), mark_rest=True)
            return h

    d = Racing(mv)
    d.mark_all()
    d.refresh()
    assert d.raced and not d.dirty.any()
    assert d.digest() == _fresh(bytearray(buf))


def test_an_idle_refresh_does_nothing_until_the_next_mark() -> None:
    buf = bytearray(3 * CP * PS)
    d = ChunkDigest(memoryview(buf))
    assert d.refresh() == 3
    assert d.refresh(settled=True) == 0 and d.refresh() == 0
    d.mark_pages(np.array([CP + 1], dtype=np.int64))
    assert d.refresh(settled=True) == 0  # just marked: not settled yet
    assert d.refresh(settled=True) == 1


def test_cover_with_the_span_given_matches_cover_without() -> None:
    """The span a caller passes only saves work: digests, dirty flags and hash counts are the same,
    for packets inside one chunk (whole or not) and across two, with and without zero pages."""
    rng = np.random.default_rng(7)
    buf = bytearray(rng.integers(0, 256, 4 * CP * PS, dtype=np.uint8).tobytes())
    plain, spanned = ChunkDigest(memoryview(buf)), ChunkDigest(memoryview(buf))
    for d in (plain, spanned):
        d.assume_zero()
    cases = [(np.arange(CP, 2 * CP), np.arange(0)), (np.arange(2 * CP, 3 * CP - 4), np.arange(3 * CP - 4, 3 * CP)),
             (np.arange(3 * CP + 64, 4 * CP), np.arange(20, 30)), (np.arange(0), np.arange(CP + 3, CP + 9)),
             (np.array([4 * CP - 1, 5]), np.arange(0))]
    for normal, zero in cases:
        normal, zero = normal.astype(np.int64), zero.astype(np.int64)
        both = np.concatenate((normal, zero))
        assert plain.cover(normal, zero, mark_rest=True) == spanned.cover(
            normal, zero, mark_rest=True, span=(int(both.min()), int(both.max())))
        assert plain.dirty.tolist() == spanned.dirty.tolist()
        assert (plain.hashes == spanned.hashes).all() and plain.hashed == spanned.hashed
    assert plain.digest() == spanned.digest()
