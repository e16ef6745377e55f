"""The bench's view of the host and of the guest's data.

The data sample is produced by the engine's own fill code (:func:`livemig.guest.fill.fill_pages`)
with the same ``fill`` and seed as the benchmarked guest, so the codec speeds and the zstd-1 ratio
in the table header are measured on the bytes the migrations move (the first pages of RAM).
"""

from __future__ import annotations

import mmap
import os
import platform
from typing import Any

import numpy as np

from ..errors import MigrationError
from ..wire.constants import PAGE_SIZE
from .model import BenchError

PAGE = PAGE_SIZE


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor() where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict[str, Any]:
    """Cores, CPU model, kernel and memory of this host."""
    mem = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cores": os.cpu_count() or 1,
        "cpu-model": cpu_model(),
        "kernel": platform.release(),
        "memory": mem,
        "kvm": os.path.exists("/dev/kvm"),
    }


def fill_array(pages: np.ndarray, fill: str, seed: int = 0) -> str:
    """Fill ``pages`` ((n, 4096) uint8, writable) exactly as a guest with ``fill`` is filled.

    Uses the engine's own :func:`livemig.guest.fill.fill_pages`; returns its description.
    Raises BenchError naming the fill when it cannot be produced.
    """
    try:
        from ..guest.fill import fill_pages
    except ImportError as exc:
        raise BenchError(f"fill '{fill}': livemig.guest.fill is not importable: {exc}") from exc
    try:
        return fill_pages(pages, fill, seed)
    except (MigrationError, OSError, ValueError) as exc:
        raise BenchError(f"fill '{fill}': {exc}") from exc


def sample_data(
    fill: str, size: int, seed: int = 0, memory: int | None = None, span: int = 256 << 20
) -> bytes:
    """``size`` bytes of a guest's RAM filled with ``fill``, spread over its first ``span`` bytes.

    The first min(``memory``, ``span``) bytes of RAM are filled as the guest's are, and the sample
    is taken from them in 1 MiB pieces at even distances, so a ``files:`` fill is represented by
    all its files rather than the first ones (rounded down to whole pages; at least one page).
    """
    size = max(size - size % PAGE, PAGE)
    region = max(size, min(memory if memory else size, span))
    pages = np.zeros((region // PAGE, PAGE), dtype=np.uint8)
    fill_array(pages, fill, seed)
    flat = pages.reshape(-1)
    piece = min(1 << 20, size)
    count = size // piece
    if region <= size or count <= 1:
        return flat[:size].tobytes()
    step = (region - piece) // (count - 1)
    step -= step % PAGE
    parts = [flat[i * step : i * step + piece] for i in range(count)]
    out = b"".join(p.tobytes() for p in parts)
    return out + flat[count * step : count * step + size - len(out)].tobytes() if len(out) < size else out


def zstd1_ratio(sample: bytes) -> float:
    """zstd level 1 ratio of ``sample``, each 512 KiB (one multifd packet) compressed on its own."""
    from ..guest.fill import corpus_ratio

    return float(corpus_ratio(sample, 1))


def write_ram_file(path: str, fill: str, size: int, seed: int = 0) -> None:
    """Create ``path`` (e.g. in /dev/shm) of ``size`` bytes holding the guest RAM for ``fill``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            pages = np.frombuffer(mm, dtype=np.uint8).reshape(-1, PAGE)
            fill_array(pages, fill, seed)
            del pages
        finally:
            try:
                mm.close()
            except BufferError:
                pass  # an exception's traceback still holds a view; the mapping goes with it
    finally:
        os.close(fd)


def zero_page_fraction(sample: bytes, page: int = PAGE_SIZE) -> float:
    """Fraction of the sample's pages that are all zero (sent as zero pages, not compressed)."""
    n = len(sample) // page
    if n == 0:
        return 0.0
    pages = np.frombuffer(sample, dtype=np.uint8, count=n * page).reshape(n, page)
    return float(np.count_nonzero(~pages.any(axis=1))) / n
