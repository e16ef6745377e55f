"""The 2-core compute limit: how fast a migration of this data could finish on this host, from the
measured speed of each method's codec and of the loopback socket copy.

Definition (documented in the table's footer and the README)::

    R  = guest RAM bytes, W = R / r the bytes on the wire (r = the method's ratio on the sample)
    C  = single-core compress speed (RAM bytes per second, the method's Compressor, 512 KiB packets)
    D  = single-core decompress speed (RAM bytes per second, the method's Decompressor)
    s  = core-seconds per byte to push bytes through a loopback TCP socket (sender + receiver)
    compute = (R/C + R/D + W*s) / cores      # both ends' work shared by the host's cores (2 here)
    link    = W / cap                        # cap = max-bandwidth in bytes/s (0: no cap, no link term)
    limit   = max(compute, link)

Both ends run on the same host, so their codec and socket work compete for the same cores: the
sum of core-seconds divided by the cores is the shortest wall time any implementation of the same
codec could reach. For ``none`` the codec terms vanish (the payload is the guest pages themselves)
and the loopback copy term is the bound. The limit ignores zero-page scanning, dirty tracking and
protocol overhead, so real runs reach a fraction of it; the table prints that fraction.

Measurements run in-process on a sample of the same data (by default 32 MiB); each speed is the
best of a few passes, timed with the wall clock (an accelerator's work is not CPU time).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..advise import measure
from ..wire.constants import PAGE_SIZE

PACKET = 128 * PAGE_SIZE  # pages per multifd packet x page size (docs/wire.md, "Multifd packet")


@dataclass(frozen=True)
class CodecSpeed:
    """Measured single-core speeds of one method on the sample."""

    method: str
    level: int
    sample_bytes: int
    compressed_bytes: int
    compress_bps: float  # RAM bytes per second
    decompress_bps: float

    @property
    def ratio(self) -> float:
        return self.sample_bytes / self.compressed_bytes if self.compressed_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclass(frozen=True)
class LoopbackSpeed:
    """Measured cost of moving bytes through one loopback TCP connection."""

    bytes: int
    wall_bps: float
    #: sender + receiver CPU seconds per byte
    core_seconds_per_byte: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_codec(method: str, sample: bytes, level: int = 1, passes: int = 3) -> CodecSpeed:
    """Single-core compress and decompress speed of ``method`` on ``sample``, in multifd packets,
    through the method's own per-channel objects (:func:`livemig.advise.measure`).

    Raises MethodUnavailable when the method cannot run here.
    """
    usable = len(sample) - len(sample) % PACKET
    if usable <= 0:
        raise ValueError(f"sample of {len(sample)} bytes is smaller than one packet ({PACKET})")
    m = measure(method, level, sample[:usable], threads=0, repeat=passes)
    compressed = round(usable / m.ratio)
    if method == "none":
        # the payload is the page itself: no codec work
        return CodecSpeed(method, level, usable, compressed, float("inf"), float("inf"))
    return CodecSpeed(method, level, usable, compressed, m.compress_rate, m.decompress_rate)


def measure_loopback(total: int = 256 << 20, chunk: int = PACKET) -> LoopbackSpeed:
    """Push ``total`` bytes through a 127.0.0.1 TCP connection (a sender and a receiver thread)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    cpu: dict[str, float] = {}
    got = [0]

    def receiver() -> None:
        conn, _ = srv.accept()
        buf = bytearray(chunk)
        t0 = time.thread_time()
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            got[0] += n
        cpu["recv"] = time.thread_time() - t0
        conn.close()

    th = threading.Thread(target=receiver, daemon=True)
    th.start()
    data = bytes(chunk)
    cli = socket.create_connection(("127.0.0.1", port))
    w0 = time.perf_counter()
    c0 = time.thread_time()
    sent = 0
    while sent < total:
        cli.sendall(data)
        sent += chunk
    cpu["send"] = time.thread_time() - c0
    cli.close()
    th.join()
    wall = time.perf_counter() - w0
    srv.close()
    return LoopbackSpeed(sent, sent / wall, (cpu["send"] + cpu.get("recv", 0.0)) / sent)


@dataclass(frozen=True)
class Limit:
    """The limit for one (method, RAM, cap), with its parts (seconds)."""

    ms: float
    compute_s: float
    link_s: float
    wire_bytes: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compute_limit(ram: int, codec: CodecSpeed, loop: LoopbackSpeed, cap: int, cores: int = 2) -> Limit:
    """The module docstring's formula. ``cap`` in bytes/s (0 = uncapped)."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    ratio = codec.ratio or 1.0
    wire = ram / ratio
    core_s = ram / codec.compress_bps + ram / codec.decompress_bps + wire * loop.core_seconds_per_byte
    compute = core_s / cores
    link = wire / cap if cap > 0 else 0.0
    return Limit(1000.0 * max(compute, link), compute, link, wire)
