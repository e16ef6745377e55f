"""Sample page data for codec measurements and tests: zero, random, corpus and mixed pages.

``corpus`` is the guest fill of the same name (``livemig.guest.fill.fill_pages``), so ``livemig
advise`` measures what a ``--fill corpus`` guest holds (:func:`synthetic_corpus` stands in only if
that module is missing). ``files:DIR`` and ``image:PATH`` are passed to the guest fill too. All kinds
are deterministic for a given seed.
"""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import numpy as np

from ..errors import GuestError
from ..wire.constants import PAGE_SIZE

#: the kinds :func:`sample_pages` makes; ``mixed`` (zero, random, one-byte and corpus pages shuffled) is a
#: test pattern, not a guest fill: the commands accept only :data:`FILLS`
KINDS = ("zero", "random", "corpus", "mixed")
#: the fills a guest (``livemig migrate``, ``bench``, ``advise`` ``--fill``) accepts, as their help says
FILLS = "corpus (built-in, default), zero, random, files:DIR, image:PATH"

_TEXT = (
    "the of and to in is was that for it with as his on be at by had this not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "page memory migration guest channel packet offset dirty bitmap vcpu kernel socket buffer compress"
)
_WORDS = _TEXT.split()


def synthetic_corpus(nbytes: int, seed: int = 0) -> bytes:
    """Deterministic compressible bytes: English-like text, numeric tables and small binary records."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    size = 0
    while size < nbytes:
        kind = rng.random()
        if kind < 0.6:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(40, 400))]
            chunk = (" ".join(words) + ".\n").encode()
        elif kind < 0.85:
            rows = [
                f"{rng.randint(0, 99999):6d} {rng.random():.6f} {rng.choice(_WORDS):>12} {rng.randint(0, 255):3d}\n"
                for _ in range(rng.randint(10, 100))
            ]
            chunk = "".join(rows).encode()
        else:
            base = rng.randbytes(16)
            chunk = b"".join(
                base[: rng.randint(4, 16)] + rng.randint(0, 65535).to_bytes(4, "little") for _ in range(256)
            )
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:nbytes]


def _fill_corpus(npages: int, seed: int) -> bytes:
    try:
        from ..guest.fill import fill_pages
    except ImportError:
        return synthetic_corpus(npages * PAGE_SIZE, seed)
    pages = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    fill_pages(pages, "corpus", seed)
    return pages.tobytes()


def _fill_spec(npages: int, spec: str, seed: int) -> bytes:
    from ..guest.fill import fill_pages

    pages = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    fill_pages(pages, spec, seed)
    return pages.tobytes()


def check_fill(spec: str, memory: int | None = None) -> None:
    """Refuse a guest fill spec that cannot be produced, before anything runs.

    Checks the form (``livemig.guest.fill.describe_fill``), that ``files:DIR`` is a directory holding
    a regular file with data, and that ``image:PATH`` is a regular file no larger than ``memory``
    bytes (when given). Raises GuestError saying what is wrong (the wording of the fill itself).
    """
    from ..guest.fill import describe_fill

    describe_fill(spec)
    kind, _, arg = spec.partition(":")
    if kind == "files":
        if not Path(arg).is_dir():
            raise GuestError(f"fill files:{arg}: not a directory")
        try:
            has_data = any(e.is_file() and e.stat().st_size > 0 for e in os.scandir(arg))
        except OSError as exc:
            raise GuestError(f"fill files:{arg}: cannot list: {exc.strerror or exc}") from exc
        if not has_data:
            raise GuestError(f"fill files:{arg}: no regular file with data in the directory")
    elif kind == "image":
        if not Path(arg).is_file():
            raise GuestError(f"fill image:{arg}: not a regular file")
        size = Path(arg).stat().st_size
        if memory is not None and size > memory:
            raise GuestError(f"fill image:{arg}: image is {size} bytes, larger than guest RAM ({memory} bytes)")


def sample_pages(npages: int, kind: str = "corpus", seed: int = 0) -> bytes:
    """``npages`` pages of ``kind`` (one of :data:`KINDS`, or a guest fill spec such as ``files:DIR``
    or ``image:PATH``), concatenated. Raises ValueError for an unknown kind, GuestError for a bad
    fill spec."""
    if kind == "zero":
        return bytes(npages * PAGE_SIZE)
    if kind == "random":
        return random.Random(seed).randbytes(npages * PAGE_SIZE)
    if kind == "corpus":
        return _fill_corpus(npages, seed)
    if kind == "mixed":
        # per page: zero, random, corpus, or a page that is mostly one repeated byte
        rng = random.Random(seed)
        corpus = _fill_corpus(npages, seed + 1)
        out = bytearray()
        for i in range(npages):
            r = rng.random()
            if r < 0.2:
                out += bytes(PAGE_SIZE)
            elif r < 0.4:
                out += rng.randbytes(PAGE_SIZE)
            elif r < 0.5:
                page = bytearray([rng.randint(0, 255)]) * PAGE_SIZE
                page[rng.randrange(PAGE_SIZE)] ^= 0xFF
                out += page
            else:
                out += corpus[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        return bytes(out)
    if kind.startswith(("files:", "image:")):
        return _fill_spec(npages, kind, seed)
    raise ValueError(f"sample kind {kind!r} is not one of {', '.join(KINDS)}, files:DIR, image:PATH")


def ratio_hint(data: bytes) -> float:
    """zlib-1 ratio of ``data`` (a quick measure of how compressible a sample is)."""
    return len(data) / max(1, len(zlib.compress(data, 1)))
