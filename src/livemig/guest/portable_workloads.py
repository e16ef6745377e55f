"""The portable guest's workloads: their state in guest RAM and the counter's reference (pure functions).

Page 0 of the workload's RAM block is the guest's own page (the *header*), as little-endian 64-bit
words::

    word 0   MAGIC ("LMWKLOAD")
    word 1   LAYOUT_VERSION
    word 2   workload code (1 dirty, 2 counter)
    word 3   vCPU count
    word 4   first page of the working set (1)
    word 5   pages in the working set
    word 6   seed (two's complement)
    word 8 + 4*i, 9 + 4*i   vCPU i: steps done n_i, value x_i

``dirty``: vCPU i counts the pages it wrote in n_i; each write stamps a write number into the
page's first word and into word ``1 + stamp % 511``.

``counter``: vCPU i runs its own chain, an LCG over 64 bits::

    x_0 = splitmix64(seed * 2**16 + i + 1),   x_{n+1} = A * x_n + C  (mod 2**64)

Step n (0-based) writes ``fmix(x_{n+1})`` (a murmur3-style finaliser) into word i of page
``ws_start + (n mod ws)``, then sets the header to (n + 1, x_{n+1}). A step is a pure function of
the header, so a guest resumed from RAM continues the chain with no gap and no repeat; the
reference for any n is computed without replaying the chain (jump-ahead in O(log n), and the last
``ws`` values vectorised), so :func:`check_counter` is cheap even after millions of steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import GuestError
from .splitmix import splitmix64

MAGIC = int.from_bytes(b"LMWKLOAD", "little")
LAYOUT_VERSION = 1
WORKLOAD_CODES = {"dirty": 1, "counter": 2}
#: words 8.. of page 0 hold 4 words per vCPU; the counter uses one word per vCPU in each page
MAX_VCPUS = (512 - 8) // 4

#: the LCG of the counter (Knuth's MMIX constants)
LCG_A = 6364136223846793005
LCG_C = 1442695040888963407
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Header:
    workload: str
    smp: int
    ws_start: int
    ws: int
    seed: int
    n: tuple[int, ...]
    x: tuple[int, ...]


def words(pages: np.ndarray) -> np.ndarray:
    """The (npages, 512) little-endian uint64 view of a (npages, 4096) uint8 page array."""
    out: np.ndarray = pages.view("<u8")
    return out


def init_header(pages: np.ndarray, workload: str, smp: int, ws_start: int, ws: int, seed: int) -> None:
    """Write a fresh header into page 0 (steps 0, counter chains at x_0)."""
    if workload not in WORKLOAD_CODES:
        raise GuestError(f"workload '{workload}' keeps no state in RAM")
    if not 1 <= smp <= MAX_VCPUS:
        raise GuestError(f"smp {smp} out of range for the {workload} workload (1..{MAX_VCPUS})")
    w = words(pages)
    w[0, :] = 0
    w[0, :7] = [MAGIC, LAYOUT_VERSION, WORKLOAD_CODES[workload], smp, ws_start, ws, seed & _M64]
    for i in range(smp):
        w[0, 8 + 4 * i] = 0
        w[0, 9 + 4 * i] = counter_x0(seed, i) if workload == "counter" else 0


def read_header(pages: np.ndarray) -> Header:
    """Parse and validate page 0; GuestError naming the first bad field."""
    w = [int(v) for v in words(pages)[0]]
    if w[0] != MAGIC:
        raise GuestError(f"workload header: magic {w[0]:#018x}, expected {MAGIC:#018x}")
    if w[1] != LAYOUT_VERSION:
        raise GuestError(f"workload header: layout version {w[1]}, expected {LAYOUT_VERSION}")
    names = {v: k for k, v in WORKLOAD_CODES.items()}
    if w[2] not in names:
        raise GuestError(f"workload header: workload code {w[2]}, expected one of {sorted(names)}")
    smp = w[3]
    if not 1 <= smp <= MAX_VCPUS:
        raise GuestError(f"workload header: smp {smp}, expected 1..{MAX_VCPUS}")
    npages = pages.shape[0]
    if w[4] < 1 or w[5] < 1 or w[4] + w[5] > npages:
        raise GuestError(f"workload header: working set pages {w[4]}+{w[5]}, expected inside 1..{npages}")
    seed = w[6] - (1 << 64) if w[6] >= 1 << 63 else w[6]
    return Header(names[w[2]], smp, w[4], w[5], seed,
                  tuple(w[8 + 4 * i] for i in range(smp)), tuple(w[9 + 4 * i] for i in range(smp)))


# --------------------------------------------------------------------------------------------------
# counter math
# --------------------------------------------------------------------------------------------------
def counter_x0(seed: int, cpu: int) -> int:
    """The chain's start value for vCPU ``cpu``."""
    return splitmix64(((seed << 16) + cpu + 1) & _M64)


def lcg_jump(x: int, n: int) -> int:
    """x_n from x_0 = x in O(log n) (composition of affine maps)."""
    a, c = LCG_A, LCG_C   # the map for 2**k steps
    ra, rc = 1, 0         # the map accumulated so far
    while n:
        if n & 1:
            ra, rc = (a * ra) & _M64, (a * rc + c) & _M64
        a, c = (a * a) & _M64, (a * c + c) & _M64
        n >>= 1
    return (ra * x + rc) & _M64


def lcg_tables(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(A_j, C_j) for j = 1..k such that x_{n+j} = A_j x_n + C_j (mod 2**64), as uint64 arrays."""
    a = np.empty(k, dtype=np.uint64)
    c = np.empty(k, dtype=np.uint64)
    ra, rc = 1, 0
    for j in range(k):
        ra, rc = (LCG_A * ra) & _M64, (LCG_A * rc + LCG_C) & _M64
        a[j], c[j] = ra, rc
    return a, c


def lcg_next(x: int, a_tab: np.ndarray, c_tab: np.ndarray, k: int) -> np.ndarray:
    """x_{n+1..n+k} from x_n (vectorised; k <= len(a_tab))."""
    with np.errstate(over="ignore"):
        out: np.ndarray = a_tab[:k] * np.uint64(x) + c_tab[:k]
    return out


def fmix(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, vectorised (what the counter stores)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xFF51AFD7ED558CCD)
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xC4CEB9FE1A85EC53)
        out: np.ndarray = x ^ (x >> np.uint64(33))
    return out


def counter_step(pages: np.ndarray, cpu: int, k: int, a_tab: np.ndarray, c_tab: np.ndarray) -> np.ndarray:
    """Run k steps of vCPU ``cpu``'s chain from the header in RAM; returns the pages written.

    The caller serialises steps of one vCPU (one thread per vCPU). ``k`` must not exceed the
    working set (no page written twice by one batch) nor the tables.
    """
    w = words(pages)
    idx = counter_pages(pages, cpu, k)
    n = int(w[0, 8 + 4 * cpu])
    x = int(w[0, 9 + 4 * cpu])
    xs = lcg_next(x, a_tab, c_tab, k)
    w[idx, cpu] = fmix(xs)
    w[0, 9 + 4 * cpu] = xs[-1]
    w[0, 8 + 4 * cpu] = n + k
    return idx


def counter_pages(pages: np.ndarray, cpu: int, k: int) -> np.ndarray:
    """The pages (int64) the next k steps of vCPU ``cpu`` write, from the header in RAM (writes nothing)."""
    w = words(pages)
    ws_start, ws, n = int(w[0, 4]), int(w[0, 5]), int(w[0, 8 + 4 * cpu])
    out: np.ndarray = ws_start + (n + np.arange(k, dtype=np.int64)) % ws
    return out


def check_counter(pages: np.ndarray, ensure: Callable[[np.ndarray], None] | None = None) -> int:
    """Check every vCPU's chain in RAM against the reference; returns the total steps.

    ``ensure(idx)``, when given, is called with the pages about to be read, before reading them
    (post-copy: :meth:`livemig.guest.base.RamBlock.ensure_pages`); page 0 must be readable already.
    Raises GuestError naming the first mismatch (vCPU, step, page, word, expected, found).
    """
    h = read_header(pages)
    if h.workload != "counter":
        raise GuestError(f"workload header says '{h.workload}', expected 'counter'")
    w = words(pages)
    for cpu in range(h.smp):
        n, x = h.n[cpu], h.x[cpu]
        x0 = counter_x0(h.seed, cpu)
        want = lcg_jump(x0, n)
        if x != want:
            raise GuestError(f"counter vCPU {cpu}: header value after {n} steps is {x:#018x}, "
                             f"expected {want:#018x}")
        m = min(n, h.ws)
        if m == 0:
            continue
        first = n - m
        a_tab, c_tab = lcg_tables_cached(m)
        expected = fmix(lcg_next(lcg_jump(x0, first), a_tab, c_tab, m))
        steps = first + np.arange(m, dtype=np.int64)
        idx = h.ws_start + steps % h.ws
        if ensure is not None:
            ensure(idx)
        found = w[idx, cpu]
        bad = np.flatnonzero(found != expected)
        if bad.size:
            b = int(bad[0])
            raise GuestError(f"counter vCPU {cpu}: step {int(steps[b])} (page {int(idx[b])}, word {cpu}) "
                             f"holds {int(found[b]):#018x}, expected {int(expected[b]):#018x}")
    return sum(h.n)


_TABLES: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.uint64), np.empty(0, np.uint64))


def lcg_tables_cached(k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`lcg_tables` of at least k entries, computed once and grown on demand (vectorised)."""
    global _TABLES
    if _TABLES[0].size < k:
        _TABLES = _lcg_tables_fast(max(k, 2 * _TABLES[0].size, 4096))
    return _TABLES


def _lcg_tables_fast(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Like lcg_tables, by doubling: from (A_j, C_j), j <= m, get j + m = (A_m A_j, A_m C_j + C_m)."""
    a, c = lcg_tables(min(k, 64))
    with np.errstate(over="ignore"):
        while a.size < k:
            am, cm = a[-1], c[-1]
            a = np.concatenate([a, a * am])
            c = np.concatenate([c, c * am + cm])
    return a[:k], c[:k]
