"""Sizes and rates with units, as users type them: ``2G``, ``512M``, ``10Gbps``, ``1.5GiB/s``.

Sizes are binary (K = 1024), like QEMU's size parser. Rates ending in ``bps``/``bit/s``/``bit`` are bits per
second with decimal prefixes (10Gbps = 10 * 10**9 / 8 bytes/s), like link speeds are quoted; rates
ending in ``B/s`` (or a bare size) are bytes per second with binary prefixes, like QEMU's
``max-bandwidth``.
"""

from __future__ import annotations

import re

from .errors import ParameterError

_BIN = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DEC = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)(?:i?b)?\s*$", re.IGNORECASE)
_BITS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(?:bps|bit/s|b/s|bit)\s*$")  # bit: tc's spelling


#: the accepted forms, as error messages and help texts name them
SIZE_FORMS = "a size like 4096, 512M, 2G or 1.5GiB (bytes; binary units, K = 1024)"
RATE_FORMS = ("a rate like 10Gbps or 100Mbit/s (bits per second) or 1GiB/s or 128M (bytes per second); "
              "0 = unlimited")


def parse_size(text: str | int, default_unit: str = "") -> int:
    """Parse a byte size (``2G``, ``512MiB``, ``4096``); binary prefixes. Raises ParameterError."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ParameterError(f"invalid size '{text}': expected {SIZE_FORMS}")
    unit = (m.group(2) or default_unit).lower()
    value = float(m.group(1)) * _BIN[unit]
    return int(value)


def parse_rate(text: str | int) -> int:
    """Parse a rate into bytes per second.

    ``10Gbps`` / ``100Mbit/s`` are bits/s with decimal prefixes; ``1G``, ``512MiB/s``, ``1GB/s`` are
    bytes/s with binary prefixes. ``0`` means unlimited. Raises ParameterError naming the text.
    """
    if isinstance(text, int):
        return text
    m = _BITS_RE.match(text)
    if m:
        return int(float(m.group(1)) * _DEC[m.group(2).lower()] / 8)
    stripped = re.sub(r"/s$", "", text.strip(), flags=re.IGNORECASE)
    if not _SIZE_RE.match(stripped):
        raise ParameterError(f"invalid rate '{text}': expected {RATE_FORMS}")
    return parse_size(stripped)


def format_size(n: float) -> str:
    """Human form of a byte count: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate_bits(bytes_per_s: float) -> str:
    """Human form of a rate in bits per second: ``9.87 Gbps``."""
    bits = bytes_per_s * 8
    for unit in ("bps", "Kbps", "Mbps", "Gbps"):
        if bits < 1000 or unit == "Gbps":
            return f"{bits:.2f} {unit}"
        bits /= 1000
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    """``1 channel``, ``2 channels``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
