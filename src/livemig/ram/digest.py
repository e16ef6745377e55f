"""RAM digests taken at switchover, cheap enough to keep downtime short.

A block's digest is xxh3-128 over the xxh3-128 digests of its chunks (2 MiB each). Each side keeps
its chunk digests up to date while the migration runs and only re-hashes, at switchover, the chunks
written since they were last hashed:

* the source learns what was written from the dirty log (every page in a sync marks its chunk);
* the destination knows exactly what it wrote (every packet marks its chunks).

A chunk's flag is cleared *before* it is hashed, and a write marks the chunk *after* writing, so a
write racing with the hash always leaves the chunk marked for another pass. ``full=True`` ignores the
cache and hashes all of RAM at switchover (about 40 ms per GiB here): it also catches a write the
dirty log missed, at the cost of downtime.
"""

from __future__ import annotations

import threading

import numpy as np
import xxhash

from ..wire.constants import PAGE_SIZE

CHUNK_PAGES = 512


class ChunkDigest:
    """Chunk digests of one RAM block (``buf`` of ``size`` bytes, pages of ``page_size``)."""

    def __init__(self, buf: memoryview, page_size: int = PAGE_SIZE, chunk_pages: int = CHUNK_PAGES) -> None:
        self.buf = buf
        self.page_size = page_size
        self.chunk_pages = chunk_pages
        self.chunk_bytes = chunk_pages * page_size
        n = -(-buf.nbytes // self.chunk_bytes)
        self.dirty = np.ones(n, dtype=bool)
        #: bumped by every mark; a chunk whose count did not move since the last settled refresh is
        #: "settled" (no write in flight), so background hashing does not hash half-received chunks
        self._touch = np.zeros(n, dtype=np.uint32)
        self._touch_seen = np.zeros(n, dtype=np.uint32)
        self.hashes = np.zeros((n, 16), dtype=np.uint8)
        self._lock = threading.Lock()
        #: chunks hashed so far (work done, for statistics)
        self.hashed = 0

    def assume_zero(self) -> None:
        """Take the block as all zero without reading it (a destination's fresh RAM): every chunk
        gets the digest of a zero chunk, nothing is left to hash until something is written."""
        with self._lock:
            zero = np.frombuffer(xxhash.xxh3_128(bytes(self.chunk_bytes)).digest(), dtype=np.uint8)
            self.hashes[:] = zero
            tail = self.buf.nbytes % self.chunk_bytes
            if tail:
                self.hashes[-1] = np.frombuffer(xxhash.xxh3_128(bytes(tail)).digest(), dtype=np.uint8)
            self.dirty[:] = False
            self._touch_seen[:] = self._touch

    def mark_pages(self, pages: np.ndarray) -> None:
        """Pages (indices) were written, or may have been."""
        if pages.size:
            c = np.asarray(pages, dtype=np.int64) // self.chunk_pages
            self._touch[c] += 1
            self.dirty[c] = True

    def mark_all(self) -> None:
        self.dirty[:] = True

    def refresh(self, limit: int = 0, settled: bool = False) -> int:
        """Hash up to ``limit`` dirty chunks (0 = all); returns how many were hashed.

        ``settled``: only chunks not marked since the previous settled refresh (for background use).
        """
        with self._lock:
            if settled:
                quiet = self._touch == self._touch_seen
                self._touch_seen[:] = self._touch
                todo = np.flatnonzero(self.dirty & quiet)
            else:
                todo = np.flatnonzero(self.dirty)
            if limit:
                todo = todo[:limit]
            self.dirty[todo] = False
            self.hashed += int(todo.size)
            for c in todo.tolist():
                start = c * self.chunk_bytes
                self.hashes[c] = np.frombuffer(
                    xxhash.xxh3_128(self.buf[start : start + self.chunk_bytes]).digest(), dtype=np.uint8
                )
            return int(todo.size)

    def digest(self, full: bool = False) -> str:
        """Hex digest of the whole block, after hashing what is still dirty (everything if ``full``)."""
        if full:
            self.mark_all()
        self.refresh()
        return xxhash.xxh3_128(self.hashes.tobytes()).hexdigest()
