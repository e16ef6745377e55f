"""The per-page payload layout shared by ``qpl`` and ``uadk`` (docs/wire.md, "Payloads").

::

    len[0] .. len[n-1]   u32 big-endian each, n = normal_pages
    data[0] .. data[n-1] concatenated; len[i] == page_size: page i sent raw,
                         0 < len[i] < page_size: page i compressed (method-specific encoding)

``next_packet_size = 4 * n + sum(len)``. QEMU checks these with ``assert``s (a bad peer aborts it);
here every rule is a :class:`~livemig.errors.PayloadError` naming the method, the page and the value:
payload over 1 MiB, table larger than the payload, a length of 0 or over the page size, lengths that
do not add up to the payload, and a compressed page that does not decode to exactly one page. Each
page decodes into its own page-sized slot: a lying entry can never write outside its page.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from typing import cast

try:
    from isal import isal_zlib
except ImportError as exc:  # a dependency in pyproject.toml; say what to install if it is missing
    raise ImportError(f"{exc}: install the isal package (pip install isal, or apt-get install python3-isal)") from exc

from .._types import Buffer
from ..errors import PayloadError
from .base import MAX_PAYLOAD

ENTRY = struct.Struct(">I")
#: what ISA-L and zlib raise on a bad stream
INFLATE_ERRORS: tuple[type[BaseException], ...] = (cast(type[BaseException], isal_zlib.error), zlib.error)


def pages_of(runs: Sequence[Buffer], page_size: int) -> list[memoryview]:
    """The runs cut into page-sized views (no copy)."""
    out: list[memoryview] = []
    for run in runs:
        mv = memoryview(run).cast("B")
        if mv.nbytes % page_size:
            raise ValueError(f"run of {mv.nbytes} bytes is not a multiple of the page size {page_size}")
        out.extend(mv[off : off + page_size] for off in range(0, mv.nbytes, page_size))
    return out


def encode(
    runs: Sequence[Buffer], page_size: int, compress_page: Callable[[memoryview], bytes | None]
) -> list[Buffer]:
    """Table + data for the pages in ``runs``.

    ``compress_page`` returns a page's encoding, or None to send it raw; an encoding that is not
    shorter than the page is sent raw too (QEMU's rule: compressed output is limited to
    ``page_size - 1`` bytes)."""
    pages = pages_of(runs, page_size)
    if not pages:
        return []
    lengths: list[int] = []
    data: list[Buffer] = []
    for page in pages:
        enc = compress_page(page)
        if enc is not None and 0 < len(enc) < page_size:
            lengths.append(len(enc))
            data.append(enc)
        else:
            lengths.append(page_size)
            data.append(page)
    return [struct.pack(f">{len(lengths)}I", *lengths), *data]


def decode(
    method: str,
    payload: Buffer,
    normal_pages: int,
    page_size: int,
    decompress_page: Callable[[memoryview], bytes],
) -> bytearray:
    """Exactly ``normal_pages * page_size`` bytes from a table payload, or PayloadError.

    ``decompress_page(data)`` must return the page's bytes (it may return more or fewer; the size is
    checked here) or raise PayloadError; it must bound its own output to ``page_size + 1`` bytes."""
    mv = memoryview(payload).cast("B")
    n = mv.nbytes
    if n > MAX_PAYLOAD:
        raise PayloadError(f"{method}: received unexpectedly large packet: {n} bytes > {MAX_PAYLOAD}")
    if normal_pages == 0:
        if n:
            raise PayloadError(f"{method}: {n} payload bytes for a packet without normal pages")
        return bytearray()
    table = 4 * normal_pages
    if table >= n:
        raise PayloadError(
            f"{method}: payload of {n} bytes cannot hold the length table of {normal_pages} pages ({table} bytes)"
            " and their data"
        )
    lengths = struct.unpack_from(f">{normal_pages}I", mv, 0)
    total = table
    for i, ln in enumerate(lengths):
        if ln == 0 or ln > page_size:
            raise PayloadError(f"{method}: page {i}: length {ln} in the table, expected 1..{page_size}")
        total += ln
    if total != n:
        raise PayloadError(f"{method}: length table adds up to {total} bytes, payload is {n}")
    out = bytearray(normal_pages * page_size)
    pos = table
    for i, ln in enumerate(lengths):
        chunk = mv[pos : pos + ln]
        dst = i * page_size
        if ln == page_size:
            out[dst : dst + page_size] = chunk
        else:
            try:
                page = decompress_page(chunk)
            except PayloadError as exc:
                raise PayloadError(f"{method}: page {i}: {exc}") from exc
            if len(page) != page_size:
                raise PayloadError(
                    f"{method}: page {i}: decompressed len {len(page)}, expected len {page_size}"
                )
            out[dst : dst + page_size] = page
        pos += ln
    return out


def inflate_raw(data: memoryview, page_size: int) -> bytes:
    """One page from a complete raw-deflate stream in ``data``, output bounded to ``page_size + 1``.

    Raises PayloadError when the stream is invalid, truncated, inflates past one page or is followed
    by stray bytes. Uses ISA-L's inflate (it releases the GIL)."""
    d = isal_zlib.decompressobj(-15)
    try:
        out: bytes = d.decompress(data, page_size)
        if not d.eof and d.unconsumed_tail:
            extra = d.decompress(d.unconsumed_tail, 1)
            if extra or not d.eof:
                raise PayloadError(f"inflates to more than {page_size} bytes")
    except INFLATE_ERRORS as exc:
        raise PayloadError(f"inflate failed: {exc}") from exc
    if not d.eof:
        raise PayloadError(f"truncated deflate stream ({len(out)} bytes inflated)")
    if d.unused_data:
        raise PayloadError(f"{len(d.unused_data)} stray bytes after the deflate stream")
    return out
