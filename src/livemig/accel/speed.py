"""Codec and loopback speeds on this host with all cores busy, and the finish-time model built on them.

The one codec measurement of the project (``livemig advise``, ``livemig bench``'s compute limit,
``multifd-compression auto``, ``scripts/codec-speed.py``) and the one model that turns speeds into a
migration time. Speeds are measured with as many concurrent threads as cores, because two busy
threads on a 2-core host do not run at twice one thread's speed (here ~1.55x: shared caches, turbo,
a nested hypervisor); a model from single-thread speeds overstates what the cores can do.

The model (:func:`finish_time`), for ``D`` bytes of non-zero guest pages, ratio ``r``, wire ``W = D / r``::

    C_k, D_k  = compress / decompress speed of k = min(channels, cores) threads at once (aggregate)
    C_n, D_n  = the same with all n cores busy
    L_n       = loopback TCP bytes/s of n connections at once (sender + receiver work, all cores)
    one host  : cpu = max(D/C_n + D/D_n + W/L_n,  D/C_k,  D/D_k)   # both ends share the cores
    two hosts : cpu = max(D/C_k, D/D_k) + W/(2 L_n)                # each end has its own cores
    link      = W / cap                   (cap = max-bandwidth or the link rate, bytes/s; 0 = none)
    time      = max(cpu, link)

Zero pages are listed in the packet and cost neither codec nor wire (docs/wire.md, "Multifd packet");
dirty tracking, zero detection and hashing are not in the model: it is a bound a real run approaches.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..compress import create_method
from ..wire.constants import PAGE_SIZE

PAGE = PAGE_SIZE
#: pages per multifd packet (docs/wire.md, "Multifd packet")
PACKET_PAGES = 128


@dataclass
class Measurement:
    """One method's codec figures on a sample (rates in page bytes per second)."""

    method: str
    level: int | None
    backend: str
    accelerated: bool
    ratio: float
    compress_rate: float  # one thread, wall clock
    decompress_rate: float
    compress_cpu: float  # CPU seconds per page byte (one thread)
    decompress_cpu: float
    compress_rate_parallel: float  # aggregate of ``threads`` threads running at once
    decompress_rate_parallel: float
    threads: int

    def compress_at(self, k: int) -> float:
        """Aggregate compress rate of ``k`` threads (see :func:`_scaled`)."""
        return _scaled(self.compress_rate, self.compress_rate_parallel, self.threads, k)

    def decompress_at(self, k: int) -> float:
        """Aggregate decompress rate of ``k`` threads."""
        return _scaled(self.decompress_rate, self.decompress_rate_parallel, self.threads, k)


def _scaled(one: float, many: float, threads: int, k: int) -> float:
    """Rate of ``k`` threads from the measured rates of 1 and ``threads``: linear in between, and
    proportional beyond ``threads`` (only when asked for more cores than were measured)."""
    if threads <= 1:
        return one * max(1, k)
    if k <= 1:
        return one
    if k >= threads:
        return many * k / threads
    return one + (many - one) * (k - 1) / (threads - 1)


def _packets(data: bytes) -> list[memoryview]:
    mv = memoryview(data)
    step = PACKET_PAGES * PAGE
    return [mv[i : i + step] for i in range(0, len(data), step)]


def _parallel(fn: Any, args: list[Any]) -> float:
    """Wall seconds for ``fn(arg)`` on one thread per arg, all started together."""
    barrier = threading.Barrier(len(args) + 1)

    def run(a: Any) -> None:
        barrier.wait()
        fn(a)

    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def measure(name: str, level: int | None, data: bytes, threads: int, repeat: int = 2) -> Measurement:
    """Codec figures of ``name`` at ``level`` on ``data`` (whole 4 KiB pages, cut into 512 KiB packets).

    Compresses and decompresses through the per-channel objects the migration uses, on one thread
    (wall and CPU time) and then on ``threads`` threads at once, each with its own channel state and
    the whole sample (aggregate rate). ``threads=0`` skips the multi-thread pass (its columns then
    repeat the one-thread figures). Best of ``repeat``. Raises MethodUnavailable.
    """
    method = create_method(name, level if level is not None else 1)
    pkts = _packets(data)
    pages = [p.nbytes // PAGE for p in pkts]
    total = len(data)

    def compress_all(ch: int) -> list[list[Any]]:
        # the buffers as the channel would send them (``none`` hands out guest RAM without a copy)
        send = method.compressor(ch)
        return [send.compress([p]) for p in pkts]

    def decompress_all(ch: int, payloads: list[bytes]) -> None:
        recv = method.decompressor(ch)
        for p, n in zip(payloads, pages, strict=True):
            recv.decompress(p, n)

    best_c = best_d = float("inf")
    cpu_c = cpu_d = float("inf")
    payloads: list[bytes] = []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.thread_time()
        bufs = compress_all(0)
        best_c = min(best_c, time.perf_counter() - w)
        cpu_c = min(cpu_c, time.thread_time() - c)
        payloads = [b"".join(b) for b in bufs]
        w, c = time.perf_counter(), time.thread_time()
        decompress_all(0, payloads)
        best_d = min(best_d, time.perf_counter() - w)
        cpu_d = min(cpu_d, time.thread_time() - c)
    wire = sum(len(p) for p in payloads)
    if threads > 0:
        par_c = min(_parallel(compress_all, list(range(threads))) for _ in range(repeat))
        par_d = min(_parallel(lambda ch: decompress_all(ch, payloads), list(range(threads))) for _ in range(repeat))
    else:  # single-core figures only: the aggregate columns repeat them
        threads, par_c, par_d = 1, best_c, best_d
    best_c, best_d, par_c, par_d = (max(x, 1e-9) for x in (best_c, best_d, par_c, par_d))
    return Measurement(
        method=name,
        level=level,
        backend=method.backend(),
        accelerated=method.accelerated(),
        ratio=total / max(1, wire),
        compress_rate=total / best_c,
        decompress_rate=total / best_d,
        compress_cpu=max(cpu_c, 1e-9) / total,
        decompress_cpu=max(cpu_d, 1e-9) / total,
        compress_rate_parallel=threads * total / par_c,
        decompress_rate_parallel=threads * total / par_d,
        threads=threads,
    )


@dataclass(frozen=True)
class LoopbackSpeed:
    """Measured cost of moving bytes through loopback TCP connections."""

    bytes: int
    #: one connection: bytes/s
    wall_bps: float
    #: one connection: sender + receiver CPU seconds per byte
    core_seconds_per_byte: float
    #: ``connections`` connections at once: aggregate bytes/s (the cores busy with socket copies)
    all_bps: float = 0.0
    connections: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _push(total: int, chunk: int, tcp: bool = True) -> tuple[float, float, int]:
    """One loopback connection (TCP on 127.0.0.1, or a Unix socket pair): (wall s, sender + receiver
    CPU s, bytes)."""
    if tcp:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
    else:
        near, far = socket.socketpair()
    cpu: dict[str, float] = {}

    def receiver() -> None:
        conn = srv.accept()[0] if tcp else far
        buf = bytearray(chunk)
        t0 = time.thread_time()
        while conn.recv_into(buf):
            pass
        cpu["recv"] = time.thread_time() - t0
        conn.close()

    th = threading.Thread(target=receiver, daemon=True)
    th.start()
    data = bytes(chunk)
    cli = socket.create_connection(("127.0.0.1", port)) if tcp else near
    w0, c0 = time.perf_counter(), time.thread_time()
    sent = 0
    while sent < total:
        cli.sendall(data)
        sent += chunk
    cpu["send"] = time.thread_time() - c0
    cli.close()
    th.join()
    wall = time.perf_counter() - w0
    if tcp:
        srv.close()
    return wall, cpu["send"] + cpu.get("recv", 0.0), sent


def measure_loopback(total: int = 128 << 20, connections: int = 1, chunk: int = PACKET_PAGES * PAGE,
                     tcp: bool = True) -> LoopbackSpeed:
    """Push ``total`` bytes through one 127.0.0.1 TCP connection, then ``total`` through each of
    ``connections`` connections at once (a sender and a receiver thread each). ``tcp=False`` uses
    Unix socket pairs instead: no port, nothing on ``lo`` (whose traffic a bench counts and may shape),
    a little cheaper per byte than TCP."""
    wall, cpu, sent = _push(total, chunk, tcp)
    all_bps = sent / wall
    if connections > 1:
        par = _parallel(lambda _i: _push(total, chunk, tcp), list(range(connections)))
        all_bps = connections * sent / par
    return LoopbackSpeed(sent, sent / wall, cpu / sent, all_bps, max(1, connections))


@dataclass(frozen=True)
class Finish:
    """What :func:`finish_time` predicts: seconds, which part decides, and the parts."""

    seconds: float
    #: "link", "cores" (one host), "sender" or "receiver" (two hosts)
    limit: str
    compute_s: float
    link_s: float
    wire_bytes: float


def finish_time(m: Measurement, loop_bps: float, data: float, cap: int, channels: int, cores: int,
                same_host: bool) -> Finish:
    """The module docstring's model for ``data`` bytes of non-zero pages with ``m``'s method.

    ``m`` measured with ``m.threads`` threads (``cores`` for all cores busy); ``loop_bps`` = the
    all-cores loopback rate (bytes/s, 0 = not counted); ``cap`` bytes/s (0 = no link term). Raises
    ValueError for channels or cores below 1."""
    if channels < 1 or cores < 1:
        raise ValueError(f"channels and cores must be >= 1, got {channels} and {cores}")
    k = min(channels, cores)
    wire = data / (m.ratio or 1.0)
    net = wire / loop_bps if loop_bps > 0 else 0.0
    codec = m.method != "none"  # none: the payload is the page itself, received straight into RAM
    comp_k, dec_k = (data / m.compress_at(k), data / m.decompress_at(k)) if codec else (0.0, 0.0)
    if same_host:
        both = data / m.compress_at(cores) + data / m.decompress_at(cores) if codec else 0.0
        shared = both + net
        compute = max(shared, comp_k, dec_k)
        part = "cores"
    else:
        compute = max(comp_k, dec_k) + net / 2
        part = "sender" if comp_k >= dec_k else "receiver"
    link = wire / cap if cap > 0 else 0.0
    return Finish(max(compute, link), "link" if link >= compute else part, compute, link, wire)
