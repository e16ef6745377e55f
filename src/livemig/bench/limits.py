"""The compute limit: how fast a migration of this data could finish on this host, from the speed
of each method's codec and of loopback TCP measured with all cores busy.

The model is :func:`livemig.accel.speed.finish_time` with both ends on this host (the one model of
``livemig advise`` and ``multifd-compression auto`` too)::

    R  = guest RAM bytes, W = R / r the bytes on the wire (r = the method's ratio on the sample)
    C, D = compress / decompress speed (RAM bytes/s) of as many threads at once as cores
    L  = loopback TCP bytes/s of as many connections at once as cores (send + receive work)
    compute = R/C + R/D + W/L               # both ends' work on the host's shared cores
    link    = W / cap                       # cap = max-bandwidth or the link rate, bytes/s (0: none)
    limit   = max(compute, link)

Speeds come from concurrent threads, not one thread times the cores: two busy threads here run at
about 1.55x one. For ``none`` the codec terms vanish (the payload is the guest pages themselves) and
the loopback copy is the bound. The limit ignores zero-page scanning, dirty tracking, hashing and
protocol overhead, so real runs reach a fraction of it; the table prints that fraction.

Measurements run in-process on a sample of the same data (by default 32 MiB); each speed is the
best of a few passes, timed with the wall clock (an accelerator's work is not CPU time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..accel.speed import LoopbackSpeed, Measurement, finish_time, measure, measure_loopback
from ..wire.constants import PAGE_SIZE

__all__ = ["CodecSpeed", "Limit", "LoopbackSpeed", "compute_limit", "measure_codec", "measure_loopback"]

PACKET = 128 * PAGE_SIZE  # pages per multifd packet x page size (docs/wire.md, "Multifd packet")


@dataclass(frozen=True)
class CodecSpeed:
    """Measured speeds of one method on the sample (RAM bytes per second)."""

    method: str
    level: int
    sample_bytes: int
    compressed_bytes: int
    #: one thread
    compress_bps: float
    decompress_bps: float
    #: ``threads`` threads at once (all cores busy); 0 = not measured (the one-thread figures x threads)
    compress_all_bps: float = 0.0
    decompress_all_bps: float = 0.0
    threads: int = 1

    @property
    def ratio(self) -> float:
        return self.sample_bytes / self.compressed_bytes if self.compressed_bytes else 0.0

    def measurement(self) -> Measurement:
        """The figures as :func:`livemig.accel.speed.finish_time` reads them."""
        many = self.threads > 1 and self.compress_all_bps > 0 and self.decompress_all_bps > 0
        return Measurement(self.method, self.level, "", False, self.ratio or 1.0, self.compress_bps,
                           self.decompress_bps, 0.0, 0.0,
                           self.compress_all_bps if many else self.compress_bps,
                           self.decompress_all_bps if many else self.decompress_bps,
                           self.threads if many else 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def measure_codec(method: str, sample: bytes, level: int = 1, passes: int = 3, threads: int = 0) -> CodecSpeed:
    """Compress and decompress speed of ``method`` on ``sample``, in multifd packets, through the
    method's own per-channel objects (:func:`livemig.accel.speed.measure`): one thread, and
    ``threads`` threads at once (0: one thread only).

    Raises MethodUnavailable when the method cannot run here.
    """
    usable = len(sample) - len(sample) % PACKET
    if usable <= 0:
        raise ValueError(f"sample of {len(sample)} bytes is smaller than one packet ({PACKET})")
    m = measure(method, level, sample[:usable], threads=threads, repeat=passes)
    compressed = round(usable / m.ratio)
    if method == "none":
        # the payload is the page itself: no codec work
        inf = float("inf")
        return CodecSpeed(method, level, usable, compressed, inf, inf, inf, inf, m.threads)
    return CodecSpeed(method, level, usable, compressed, m.compress_rate, m.decompress_rate,
                      m.compress_rate_parallel, m.decompress_rate_parallel, m.threads)


@dataclass(frozen=True)
class Limit:
    """The limit for one (method, RAM, cap), with its parts (seconds)."""

    ms: float
    compute_s: float
    link_s: float
    wire_bytes: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compute_limit(ram: int, codec: CodecSpeed, loop: LoopbackSpeed, cap: int, cores: int = 2,
                  channels: int = 0) -> Limit:
    """The module docstring's formula. ``cap`` in bytes/s (0 = uncapped); ``channels`` 0 = as many as cores.

    A loopback measured on one connection only counts its CPU cost shared by the cores."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    loop_bps = loop.all_bps if loop.connections > 1 else cores / max(loop.core_seconds_per_byte, 1e-15)
    f = finish_time(codec.measurement(), loop_bps, float(ram), cap, channels or cores, cores, same_host=True)
    return Limit(1000.0 * f.seconds, f.compute_s, f.link_s, f.wire_bytes)
