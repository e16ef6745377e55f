"""RAM digests taken at switchover, cheap enough to keep downtime short.

A block's digest is xxh3-128 over the xxh3-128 digests of its chunks. A chunk is one multifd packet's
worth of pages (:data:`CHUNK_PAGES`, 512 KiB of 4 KiB pages), so the first pass, whose packets are
the block's consecutive 128-page runs, covers each chunk with exactly one packet. Each side keeps its
chunk digests up to date while the migration runs and only re-hashes, at switchover, the chunks
written since they were last hashed:

* a chunk one packet covers whole is hashed by the channel thread that handles that packet, right
  after it compressed (source) or wrote (destination) those pages, while they are in cache
  (:meth:`ChunkDigest.cover`); a chunk that packet lists only as zero pages gets the zero-chunk
  digest without being read;
* the source learns what the guest wrote from the dirty log (every page in a sync marks its chunk);
* the destination marks the chunks a packet covers only in part; a background thread hashes them
  once no write touched them for a while (``refresh(settled=True)``).

So the destination hashes each chunk once per pass that writes it whole, and a chunk written in
part, again, only when a later packet wrote it (``hashed`` counts the chunks hashed: at most about
1x RAM for a single pass).

Ordering: a chunk's flag is cleared *before* it is hashed, and a write marks the chunk *after*
writing, so a write racing with the hash always leaves the chunk marked for another pass. A
background hash stores its result only if no mark and no :meth:`ChunkDigest.cover` came while it was
hashing (a generation count per chunk), so it never replaces a newer digest. ``full=True`` ignores
the cache and hashes all of RAM at switchover: it also catches a write the dirty log missed, at the
cost of downtime.
"""

from __future__ import annotations

import threading

import numpy as np
import xxhash

from ..wire.constants import PAGE_SIZE

#: pages per chunk: one multifd packet of 4 KiB pages (docs/wire.md, "Multifd packet")
CHUNK_PAGES = 128


class ChunkDigest:
    """Chunk digests of one RAM block (``buf`` of ``size`` bytes, pages of ``page_size``)."""

    def __init__(self, buf: memoryview, page_size: int = PAGE_SIZE, chunk_pages: int = CHUNK_PAGES) -> None:
        self.buf = buf
        self.page_size = page_size
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * page_size
        self.npages = buf.nbytes // page_size
        n = -(-buf.nbytes // self.chunk_bytes)
        self.dirty = np.ones(n, dtype=bool)
        #: bumped by every mark and every cover; a background hash keeps its result only if the
        #: count did not move while it hashed, and a chunk whose count did not move since the last
        #: settled refresh is "settled" (no write in flight)
        self._gen = np.zeros(n, dtype=np.uint32)
        self._gen_seen = np.zeros(n, dtype=np.uint32)
        #: chunk digests, 16 bytes each; ``hashes`` is a numpy view of them
        self._hash_bytes = bytearray(16 * n)
        self.hashes = np.frombuffer(self._hash_bytes, dtype=np.uint8).reshape(n, 16)
        #: guards the arrays above (held briefly, never while hashing)
        self._lock = threading.Lock()
        #: one refresh at a time: the final digest waits for a background refresh in progress
        self._refreshing = threading.Lock()
        self._zero = xxhash.xxh3_128(bytes(self.chunk_bytes)).digest()
        #: chunks hashed so far (work done, for statistics; zero chunks taken as such are not counted)
        self.hashed = 0
        #: False once a refresh found nothing dirty, until the next mark: an idle refresh returns at once
        self._marked = True

    def _hash(self, c: int) -> bytes:
        start = c * self.chunk_bytes
        return xxhash.xxh3_128(self.buf[start : start + self.chunk_bytes]).digest()

    def _zero_digest(self, c: int) -> bytes:
        start = c * self.chunk_bytes
        size = min(self.chunk_bytes, self.buf.nbytes - start)
        return self._zero if size == self.chunk_bytes else xxhash.xxh3_128(bytes(size)).digest()

    def assume_zero(self) -> None:
        """Take the block as all zero without reading it (a destination's fresh RAM): every chunk
        gets the digest of a zero chunk, nothing is left to hash until something is written."""
        with self._lock:
            self.hashes[:] = np.frombuffer(self._zero, dtype=np.uint8)
            if len(self.hashes):
                self.hashes[-1] = np.frombuffer(self._zero_digest(len(self.hashes) - 1), dtype=np.uint8)
            self.dirty[:] = False
            self._gen_seen[:] = self._gen

    def mark_pages(self, pages: np.ndarray) -> None:
        """Pages (indices) were written, or may have been."""
        if pages.size:
            c = np.asarray(pages, dtype=np.int64) // self.chunk_pages
            with self._lock:
                self._gen[c] += 1
                self.dirty[c] = True
                self._marked = True

    def mark_all(self) -> None:
        with self._lock:
            self._gen += 1
            self.dirty[:] = True
            self._marked = True

    def cover(self, normal: np.ndarray, zero: np.ndarray, mark_rest: bool,
              span: tuple[int, int] | None = None) -> int:
        """One packet's pages were just handled: ``normal`` (read or written) and ``zero`` (pages that
        are zero now), int64 page indices, each listed once (a packet's offsets are unique:
        :func:`~livemig.wire.packet.check_packet`), any order. Every chunk these pages cover whole is
        hashed now (its digest is up to date as of this call); a chunk covered only by ``zero`` gets
        the zero-chunk digest unread. ``mark_rest``: mark the chunks covered only in part (a
        receiver's writes); a sender leaves them as the dirty log marked them. ``span``: the lowest
        and highest of these pages when the caller knows them (saves two passes over them). Returns
        the chunks hashed.

        Only for chunks no other thread writes meanwhile: a multifd pass lists each page once, so a
        chunk one packet covers whole is written by that packet alone until the next pass.
        """
        cp = self.chunk_pages
        count = normal.size + zero.size
        if not count:
            return 0
        pages = None
        if span is None:
            pages = np.concatenate((normal, zero)) if zero.size else normal
            span = int(pages.min()), int(pages.max())
        c0, c1 = span[0] // cp, span[1] // cp
        if c0 == c1:  # the usual packet: one chunk, whole when it lists as many pages as the chunk has
            if count != self._chunk_len(c0):
                return self._store([], [c0], mark_rest, 0)
            if not normal.size:  # zero pages only: the chunk is zero, its digest known unread
                return self._store([(c0, self._zero_digest(c0))], [], mark_rest, 0)
            return self._store([(c0, self._hash(c0))], [], mark_rest, 1)
        if pages is None:
            pages = np.concatenate((normal, zero)) if zero.size else normal
        chunks, counts = np.unique(pages // cp, return_counts=True)
        full = counts == np.minimum(cp, self.npages - chunks * cp)
        whole, part = chunks[full].tolist(), chunks[~full].tolist()
        out: list[tuple[int, bytes]] = []
        hashed = 0
        for c in whole:
            if not normal.size or (zero.size and not np.any(normal // cp == c)):
                out.append((c, self._zero_digest(c)))
            else:
                out.append((c, self._hash(c)))
                hashed += 1
        return self._store(out, part, mark_rest, hashed)

    def _store(self, out: list[tuple[int, bytes]], part: list[int], mark_rest: bool, hashed: int) -> int:
        """:meth:`cover`'s results: the digests ``out`` of the chunks covered whole, and a mark on
        the chunks ``part`` covered only in part when ``mark_rest``; returns ``hashed``."""
        with self._lock:
            for c, h in out:
                self._gen[c] += 1
                self._hash_bytes[16 * c : 16 * c + 16] = h
                self.dirty[c] = False
            if mark_rest:
                for c in part:
                    self._gen[c] += 1
                    self.dirty[c] = True
                    self._marked = True
            self.hashed += hashed
        return hashed

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_pages, self.npages - c * self.chunk_pages)

    def refresh(self, limit: int = 0, settled: bool = False) -> int:
        """Hash up to ``limit`` dirty chunks (0 = all); returns how many were hashed.

        ``settled``: only chunks not marked since the previous settled refresh (for background use).
        """
        with self._refreshing:
            with self._lock:
                if not self._marked:
                    return 0
                if settled:
                    quiet = self._gen == self._gen_seen
                    self._gen_seen[:] = self._gen
                    todo = np.flatnonzero(self.dirty & quiet)
                else:
                    todo = np.flatnonzero(self.dirty)
                if not todo.size and not self.dirty.any():
                    self._marked = False
                if limit:
                    todo = todo[:limit]
                self.dirty[todo] = False
                gens = self._gen[todo].tolist()
            for c, g in zip(todo.tolist(), gens, strict=True):
                h = self._hash(c)
                with self._lock:
                    if self._gen[c] == g:  # else a mark (dirty again) or a cover (newer digest) came
                        self.hashes[c] = np.frombuffer(h, dtype=np.uint8)
            with self._lock:
                self.hashed += int(todo.size)
            return int(todo.size)

    def digest(self, full: bool = False) -> str:
        """Hex digest of the whole block, after hashing what is still dirty (everything if ``full``)."""
        if full:
            self.mark_all()
        self.refresh()
        with self._lock:
            return xxhash.xxh3_128(self.hashes.tobytes()).hexdigest()
