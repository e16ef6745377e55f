"""What guest RAM holds at start: the ``fill`` of :class:`~livemig.guest.base.GuestConfig`.

Specs (``fill_pages(pages, spec, seed)``, ``pages`` a writable ``(n, 4096)`` uint8 view):

``zero``
    Nothing is written: a fresh memfd already reads as zeros, and touching it would only pay the
    first-touch cost of every page.
``random``
    Incompressible bytes from ``numpy.random.Generator(PCG64(seed))`` (its raw 64-bit stream, in
    order, so the content depends only on the seed and the size).
``corpus``
    The built-in deterministic generator with Silesia-like compressibility (see
    :func:`generate_base`). Needs no file: a fresh machine has no corpus on disk.
``files:DIR``
    The regular files of DIR in sorted name order, concatenated and repeated until RAM is full
    (for example a directory holding the Silesia corpus).
``image:PATH``
    A raw image copied to the start of RAM; the rest stays zero (untouched). Larger than RAM is
    an error.

Measured figures of ``corpus`` (seed 0, 32 MiB, each 512 KiB chunk compressed on its own, pyzstd
0.20 / zlib of Python 3.11): zstd level 1 **3.24x**, zlib level 1 **3.03x** (seeds 1-3, 7:
3.23-3.28x / 3.02-3.04x); zero pages 2.0 %.
For comparison, five files of the Silesia corpus (dickens, mr, nci, ooffice, samba) measured the same way give
zstd-1 4.03x / zlib-1 3.59x (nci, a chemical database, alone is 11.6x); the whole Silesia corpus
is usually quoted at ~2.9x zstd-1. Generation: see :func:`fill_corpus`.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import GuestError
from ..wire.constants import PAGE_SIZE
from .splitmix import GAMMA, mix64

#: zstd-1 / zlib-1 ratios of the ``corpus`` fill as measured (see the module docstring)
CORPUS_ZSTD1_RATIO = 3.24
CORPUS_ZLIB1_RATIO = 3.03
#: share of zero pages in the ``corpus`` fill
CORPUS_ZERO_SHARE = 0.02

#: the corpus is built of segments of this many pages, each of one kind of content
SEGMENT_PAGES = 16
SEGMENT_BYTES = SEGMENT_PAGES * PAGE_SIZE
#: pages of the generated base region that is tiled over RAM (8 MiB)
BASE_PAGES = 2048
BASE_SEGMENTS = BASE_PAGES // SEGMENT_PAGES

#: chunk size of :func:`corpus_ratio` (QEMU's MULTIFD_PACKET_SIZE)
RATIO_CHUNK = 512 << 10

#: how much of the base goes to each kind of content (segments), calibrated to the ratios above
_MIX = {"text": 0.26, "records": 0.65, "samples": 0.09}

_KNOWN = "zero, random, corpus, files:DIR, image:PATH"


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def fill_pages(pages: np.ndarray, spec: str, seed: int = 0) -> str:
    """Fill ``pages`` (a writable C-contiguous ``(n, 4096)`` uint8 array) in place as ``spec`` says.

    Returns a one-line description of what was written. Raises GuestError on an unknown spec, a
    missing or empty directory, an unreadable or oversized image, or a wrongly shaped array.
    """
    _check_pages(pages)
    kind, arg = _parse(spec)
    if kind == "zero":
        return "zero: all pages zero (fresh memory, not touched)"
    if kind == "random":
        fill_random(pages, seed)
        return f"random: {pages.nbytes} incompressible bytes (PCG64 seed {seed})"
    if kind == "corpus":
        fill_corpus(pages, seed)
        return f"{describe_fill('corpus')}, seed {seed}"
    if kind == "files":
        return fill_files(pages, arg)
    return fill_image(pages, arg)


def describe_fill(spec: str) -> str:
    """A one-line description of a fill spec without filling anything (validates the spec's form)."""
    kind, arg = _parse(spec)
    if kind == "zero":
        return "zero: all pages zero"
    if kind == "random":
        return "random: incompressible PCG64 bytes"
    if kind == "corpus":
        return ("corpus: built-in Silesia-like generator (text, records, samples; "
                f"{CORPUS_ZERO_SHARE:.0%} zero pages; "
                f"zstd-1 {CORPUS_ZSTD1_RATIO}x, zlib-1 {CORPUS_ZLIB1_RATIO}x per 512 KiB)")
    if kind == "files":
        return f"files: regular files of {arg} in name order, cycled"
    return f"image: raw image {arg} at the start of RAM, the rest zero"


def corpus_ratio(sample: bytes | bytearray | memoryview | np.ndarray, level: int = 1,
                 chunk: int = RATIO_CHUNK) -> float:
    """Compression ratio (input / output) of ``sample`` with zstd ``level``, each ``chunk`` on its own.

    Each 512 KiB chunk (a multifd packet's worth) is compressed independently, so the figure is what
    a packet sees, not what one long stream would get.
    """
    import pyzstd

    data = memoryview(np.ascontiguousarray(np.frombuffer(sample, dtype=np.uint8)).data)
    if len(data) == 0:
        raise GuestError("corpus_ratio: empty sample")
    out = 0
    for off in range(0, len(data), chunk):
        out += len(pyzstd.compress(data[off:off + chunk], level))
    return len(data) / out


# --------------------------------------------------------------------------------------------------
# the fills
# --------------------------------------------------------------------------------------------------
def fill_random(pages: np.ndarray, seed: int) -> None:
    """PCG64(seed)'s raw 64-bit stream, in order, 1 MiB at a time (~2.8 GB/s on prefaulted RAM)."""
    flat = pages.reshape(-1)
    bitgen = np.random.PCG64(seed)
    step = 1 << 20
    for off in range(0, flat.size, step):
        n = min(step, flat.size - off)
        words = bitgen.random_raw((n + 7) // 8)
        flat[off:off + n] = words.view(np.uint8)[:n]


def fill_corpus(pages: np.ndarray, seed: int, threads: int | None = None) -> None:
    """Tile the generated base region (:func:`generate_base`) over ``pages``.

    RAM segment ``s`` (16 pages) = base segment ``s mod 128`` XOR a one-byte key (see
    :func:`_segment_keys`), and the base's zero pages stay zero. A key is a bijection on bytes, so a
    segment keeps its own compressibility exactly, while two copies of the same base segment (8 MiB
    apart, or wherever the dirty order brings them next to each other in one channel's stream)
    differ in every byte: no compressor window sees repeats the base does not have, whatever the
    channel count.

    The cost is one XOR pass (numpy, GIL released), split over ``threads`` threads (default: one
    per CPU, at most 4) because on fresh memory the kernel's first-touch cost per page dominates
    and the page faults of several threads proceed in parallel.
    """
    base, zero_pages = generate_base(seed)
    n = pages.shape[0]
    if n == 0:
        return
    nseg = (n + SEGMENT_PAGES - 1) // SEGMENT_PAGES
    keys = _segment_keys(seed, nseg)
    if threads is None:
        threads = min(os.cpu_count() or 1, 4)
    per = max(BASE_SEGMENTS, -(-nseg // max(1, threads)))
    ranges = [(lo, min(nseg, lo + per)) for lo in range(0, nseg, per)]
    if len(ranges) == 1:
        _corpus_range(pages, base, zero_pages, keys, 0, nseg)
        return
    errors: list[BaseException] = []

    def run(lo: int, hi: int) -> None:
        try:
            _corpus_range(pages, base, zero_pages, keys, lo, hi)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    workers = [threading.Thread(target=run, args=r, name="fill-corpus") for r in ranges[1:]]
    for w in workers:
        w.start()
    run(*ranges[0])
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


def _corpus_range(pages: np.ndarray, base: np.ndarray, zero_pages: np.ndarray, keys: np.ndarray,
                  lo: int, hi: int) -> None:
    """Fill RAM segments [lo, hi) (the last one may be partial at the end of RAM)."""
    n = pages.shape[0]
    base64 = base.view(np.uint64).reshape(BASE_PAGES, PAGE_SIZE // 8)
    s = lo
    while s < hi:
        b0 = s % BASE_SEGMENTS
        cnt = min(BASE_SEGMENTS - b0, hi - s)
        p0, p1 = s * SEGMENT_PAGES, min(n, (s + cnt) * SEGMENT_PAGES)
        bp0 = b0 * SEGMENT_PAGES
        full = (p1 - p0) // SEGMENT_PAGES  # whole segments: one key per 64 KiB row
        if full:
            np.bitwise_xor(base64[bp0:bp0 + full * SEGMENT_PAGES].reshape(full, -1), keys[s:s + full, None],
                           out=pages[p0:p0 + full * SEGMENT_PAGES].view(np.uint64).reshape(full, -1))
        if p0 + full * SEGMENT_PAGES < p1:  # the partial segment at the end of RAM
            q0 = p0 + full * SEGMENT_PAGES
            np.bitwise_xor(base64[bp0 + full * SEGMENT_PAGES:bp0 + p1 - p0], keys[s + full],
                           out=pages[q0:p1].view(np.uint64))
        zp = zero_pages[(zero_pages >= bp0) & (zero_pages < bp0 + p1 - p0)]
        pages[p0 + zp - bp0] = 0
        s += cnt


def fill_files(pages: np.ndarray, directory: str) -> str:
    """The regular files of ``directory`` in sorted name order, concatenated, cycled to fill RAM."""
    path = Path(directory)
    if not path.is_dir():
        raise GuestError(f"fill files:{directory}: not a directory")
    try:
        files = sorted((e for e in os.scandir(path) if e.is_file()), key=lambda e: e.name)
        sizes = [e.stat().st_size for e in files]
    except OSError as exc:
        raise GuestError(f"fill files:{directory}: cannot list: {exc}") from exc
    total = sum(sizes)
    if total == 0:
        raise GuestError(f"fill files:{directory}: no regular file with data in the directory")
    flat = pages.reshape(-1)
    size = flat.size
    off = 0
    for entry, fsize in zip(files, sizes, strict=True):
        if off >= size:
            break
        want = min(fsize, size - off)
        try:
            with open(entry.path, "rb") as fh:
                got = fh.readinto(flat[off:off + want].data)
        except OSError as exc:
            raise GuestError(f"fill files:{directory}: cannot read {entry.name}: {exc}") from exc
        if got != want:
            raise GuestError(f"fill files:{directory}: {entry.name} changed while reading "
                             f"(read {got} bytes, expected {want})")
        off += want
    # later cycles copy from RAM itself, doubling each time (off stays a multiple of the period)
    while off < size:
        n = min(off, size - off)
        flat[off:off + n] = flat[:n]
        off += n
    cycles = size / total
    return (f"files:{directory}: {len(files)} files, {total} bytes"
            + (f", cycled {cycles:.2f} times" if cycles > 1 else f", first {size} bytes"))


def fill_image(pages: np.ndarray, image: str) -> str:
    """Copy the raw image file to the start of RAM; the rest is left as it is (zero)."""
    try:
        isize = os.stat(image).st_size
    except OSError as exc:
        raise GuestError(f"fill image:{image}: cannot open: {exc}") from exc
    if not Path(image).is_file():
        raise GuestError(f"fill image:{image}: not a regular file")
    if isize > pages.nbytes:
        raise GuestError(f"fill image:{image}: image is {isize} bytes, "
                         f"larger than guest RAM ({pages.nbytes} bytes)")
    flat = pages.reshape(-1)
    try:
        with open(image, "rb") as fh:
            got = fh.readinto(flat[:isize].data)
    except OSError as exc:
        raise GuestError(f"fill image:{image}: cannot read: {exc}") from exc
    if got != isize:
        raise GuestError(f"fill image:{image}: short read ({got} of {isize} bytes)")
    return f"image:{image}: {isize} bytes at offset 0, {pages.nbytes - isize} bytes zero"


# --------------------------------------------------------------------------------------------------
# the corpus generator
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def generate_base(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 8 MiB base region of the corpus fill and the indices of its zero pages (both read-only).

    128 segments of 64 KiB, each of one kind, in a seeded random order:

    * ``text`` (26 %): English-like prose from a seeded Zipf-distributed vocabulary of pseudo-words
      and a table of recurring phrases (a first-order model of word sequences), with spaces,
      punctuation and line breaks (as dickens, samba's sources);
    * ``records`` (65 %): arrays of 48-byte structs built from per-type templates, with an
      incrementing id, heap-like pointers and values from a small set (as mr's headers, nci's
      tables, office binaries);
    * ``samples`` (9 %): 16-bit samples of a bounded random walk, little-endian (as x-ray, mr's
      pixels): no long repeats, skewed byte statistics.

    Then 2 % of the pages, spread at random, are zeroed (real RAM images hold some free pages;
    Silesia itself has almost none). Deterministic in ``seed``; about 0.3 s.
    """
    rng = np.random.Generator(np.random.PCG64([seed, 0x5113_5141]))
    counts = _mix_counts(BASE_SEGMENTS)
    kinds = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(kinds)
    base = np.empty((BASE_SEGMENTS, SEGMENT_BYTES), dtype=np.uint8)
    makers = [_text, _records, _samples]
    for k, make in enumerate(makers):
        rows = np.flatnonzero(kinds == k)
        if rows.size:
            base[rows] = make(rng, rows.size * SEGMENT_BYTES).reshape(rows.size, SEGMENT_BYTES)
    nzero = int(round(BASE_PAGES * CORPUS_ZERO_SHARE))
    zero_pages = np.sort(rng.choice(BASE_PAGES, nzero, replace=False)).astype(np.int64)
    base.reshape(BASE_PAGES, PAGE_SIZE)[zero_pages] = 0
    flat_base = base.reshape(-1)
    flat_base.flags.writeable = False
    zero_pages.flags.writeable = False
    return flat_base, zero_pages


def _mix_counts(nseg: int) -> list[int]:
    shares = list(_MIX.values())
    counts = [int(round(s * nseg)) for s in shares]
    counts[1] += nseg - sum(counts)
    return counts


def _segment_keys(seed: int, nseg: int) -> np.ndarray:
    """One key byte per RAM segment, replicated into a uint64.

    Segment s is copy t = s // 128 of base segment b = s % 128; its key is
    ``(splitmix64(seed, b) + 157 t) mod 256``, so the 256 copies of one base segment nearest to each
    other (2 GiB of RAM) all have different keys, hence differ in every byte.
    """
    s = np.arange(nseg, dtype=np.uint64)
    b = s % np.uint64(BASE_SEGMENTS)
    t = s // np.uint64(BASE_SEGMENTS)
    with np.errstate(over="ignore"):
        z = mix64((b + np.uint64((seed * GAMMA) & 0xFFFFFFFFFFFFFFFF)) * np.uint64(GAMMA))
        key = (z + t * np.uint64(157)) & np.uint64(0xFF)
        keys: np.ndarray = key * np.uint64(0x0101010101010101)
    return keys


_LETTERS = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
_LETTER_CUM = np.cumsum([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2,
                         2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07])
_LETTER_CUM = _LETTER_CUM / _LETTER_CUM[-1]


def _zipf_cum(n: int, s: float, q: float = 2.7) -> np.ndarray:
    p = 1.0 / (np.arange(n) + q) ** s
    c = np.cumsum(p)
    out: np.ndarray = c / c[-1]
    return out


def _expand(ids: np.ndarray, lens: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Concatenate ``table[i, :lens[i]]`` for each i in ids (vectorised)."""
    starts = np.cumsum(lens) - lens
    total = int(lens.sum())
    rows = np.repeat(ids, lens)
    cols = np.arange(total) - np.repeat(starts, lens)
    out: np.ndarray = table[rows, cols]
    return out


def _text(rng: np.random.Generator, n: int, vocab_size: int = 2000, nphrases: int = 3000) -> np.ndarray:
    lens = np.sort(np.clip(rng.geometric(0.25, vocab_size) + 1, 2, 14))  # frequent words are short
    vocab = np.full((vocab_size, 16), ord(" "), dtype=np.uint8)
    letters = _LETTERS[np.searchsorted(_LETTER_CUM, rng.random((vocab_size, 16)))]
    mask = np.arange(16)[None, :] < lens[:, None]
    vocab[mask] = letters[mask]
    word_cum = _zipf_cum(vocab_size, 1.2)
    # phrases: 3..8 words
    pwords_n = rng.integers(3, 9, nphrases)
    pw = np.searchsorted(word_cum, rng.random(int(pwords_n.sum())))
    pbytes = _expand(pw, lens[pw] + 1, vocab)
    plen = np.add.reduceat(lens[pw] + 1, np.cumsum(pwords_n) - pwords_n)
    width = int(max(16, plen.max()))
    table = np.full((vocab_size + nphrases, width), ord(" "), dtype=np.uint8)
    table[:vocab_size, :16] = vocab
    pmask = np.arange(width)[None, :] < plen[:, None]
    table[vocab_size:][pmask] = pbytes
    tok_len = np.concatenate([lens + 1, plen])
    ntok = n // 5 + 64
    is_phrase = rng.random(ntok) < 0.3
    ids = np.where(is_phrase, vocab_size + np.searchsorted(_zipf_cum(nphrases, 1.0), rng.random(ntok)),
                   np.searchsorted(word_cum, rng.random(ntok)))
    out = _expand(ids, tok_len[ids], table)
    while out.size < n:  # rare: tokens came out short
        out = np.concatenate([out, out[: n - out.size]])
    out = out[:n]
    spaces = np.flatnonzero(out == ord(" "))
    r = rng.random(spaces.size)
    out[spaces[r < 0.06]] = ord(",")
    out[spaces[(r >= 0.06) & (r < 0.11)]] = ord(".")
    out[spaces[(r >= 0.11) & (r < 0.15)]] = ord("\n")
    return out


def _records(rng: np.random.Generator, n: int, size: int = 48, ntypes: int = 64) -> np.ndarray:
    nrec = n // size + 1
    templates = rng.integers(0, 256, (ntypes, size), dtype=np.uint8)
    templates[:, 24:] &= np.where(rng.random((ntypes, size - 24)) < 0.6, 0, 0xFF).astype(np.uint8)
    rec = templates[np.searchsorted(_zipf_cum(ntypes, 1.1), rng.random(nrec))]
    ids = (np.arange(nrec, dtype=np.uint32) + np.uint32(rng.integers(0, 1 << 20))).astype("<u4")
    rec[:, 0:4] = ids.view(np.uint8).reshape(-1, 4)
    ptr = (0x7F3A_0000_0000 + np.cumsum(rng.integers(1, 4, nrec) * 64)).astype("<u8")
    rec[:, 8:16] = ptr.view(np.uint8).reshape(-1, 8)
    values = (rng.integers(0, 256, 32) * 1000).astype("<u4")
    val = values[np.searchsorted(_zipf_cum(32, 1.0), rng.random(nrec))]
    rec[:, 16:20] = val.view(np.uint8).reshape(-1, 4)
    out: np.ndarray = rec.reshape(-1)[:n]
    return out


def _samples(rng: np.random.Generator, n: int) -> np.ndarray:
    k = (n + 1) // 2
    walk = np.cumsum(rng.integers(-8, 9, k)) % 4096
    out: np.ndarray = walk.astype("<u2").view(np.uint8)[:n]
    return out


# --------------------------------------------------------------------------------------------------
def _parse(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str):
        raise GuestError(f"fill spec must be a string, got {type(spec).__name__}")
    if spec in ("zero", "random", "corpus"):
        return spec, ""
    for prefix in ("files", "image"):
        if spec.startswith(prefix + ":"):
            arg = spec[len(prefix) + 1:]
            if not arg:
                raise GuestError(f"fill '{spec}': missing path after '{prefix}:'")
            return prefix, arg
    raise GuestError(f"unknown fill '{spec}' (expected one of: {_KNOWN})")


def _check_pages(pages: np.ndarray) -> None:
    if (not isinstance(pages, np.ndarray) or pages.dtype != np.uint8 or pages.ndim != 2
            or pages.shape[1] != PAGE_SIZE or not pages.flags.c_contiguous or not pages.flags.writeable):
        shape = getattr(pages, "shape", None)
        dtype = getattr(pages, "dtype", None)
        raise GuestError(f"fill: pages must be a writable C-contiguous (n, {PAGE_SIZE}) uint8 array, "
                         f"got shape {shape} dtype {dtype}")


# --------------------------------------------------------------------------------------------------
def _measure(argv: list[str] | None = None) -> int:
    """``python3 -m livemig.guest.fill [--size 2G] [--spec corpus] [--seed 0]``: speed and ratios.

    Fills a fresh RAM block (first touch included), then the same prefaulted block again (the
    generator's own speed), and measures zstd-1 / zlib-1 ratios per 512 KiB on the first 32 MiB.
    """
    import argparse
    import time
    import zlib

    from ..units import parse_size
    from .base import RamBlock

    ap = argparse.ArgumentParser(prog="python3 -m livemig.guest.fill", description=_measure.__doc__)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--spec", default="corpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    t = time.perf_counter()
    if args.spec == "corpus":
        generate_base(args.seed)
        print(f"base region ({BASE_PAGES * PAGE_SIZE >> 20} MiB) generated in {time.perf_counter() - t:.3f} s")
    block = RamBlock("measure", size)
    try:
        t = time.perf_counter()
        desc = fill_pages(block.pages, args.spec, args.seed)
        fresh = time.perf_counter() - t
        t = time.perf_counter()
        fill_pages(block.pages, args.spec, args.seed)
        warm = time.perf_counter() - t
        print(desc)
        print(f"fill {size} bytes: fresh memory {size / fresh / 1e9:.2f} GB/s ({fresh:.3f} s), "
              f"prefaulted {size / warm / 1e9:.2f} GB/s ({warm:.3f} s)")
        sample = block.pages.reshape(-1)[: 32 << 20].tobytes()
        zl = len(sample) / sum(len(zlib.compress(sample[i:i + RATIO_CHUNK], 1))
                               for i in range(0, len(sample), RATIO_CHUNK))
        zero = float((~block.pages[: (32 << 20) // PAGE_SIZE].any(axis=1)).mean())
        print(f"first {len(sample) >> 20} MiB, per 512 KiB: zstd-1 {corpus_ratio(sample):.3f}x, "
              f"zlib-1 {zl:.3f}x, zero pages {zero:.2%}")
    finally:
        block.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_measure())
