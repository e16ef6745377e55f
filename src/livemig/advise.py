"""``livemig advise``: which multifd compression method suits this host and link.

For each method that can run here (at its default level; more with ``candidates``), :func:`measure`
compresses and decompresses a sample of guest pages (the built-in ``corpus`` fill by default) in
512 KiB packets through the same per-channel objects the migration uses, on one thread and then on
``min(channels, cores)`` threads at once, timing wall clock and CPU. :func:`predict` turns that into
a throughput for the link::

    sender   = compress rate with the channels' threads      (page bytes/s the sender can produce)
    receiver = decompress rate with the channels' threads
    link     = bandwidth x ratio                              (page bytes/s that fit on the wire)
    rate     = min(sender, receiver, link);   pages/s = rate / 4096
    CPU % per side = rate x (codec CPU seconds per page byte) x 100   (100 % = one core busy)

The codec's CPU time is all it counts: the network stack and the migration's own bookkeeping come on
top. A hardware backend shows as low CPU time per byte, so the same formulas hold for QAT.

:func:`recommend` picks the method with the highest predicted pages/s, preferring the lower total
CPU % when two are within 5 %. When accelerators are present it first applies the QEMU feature
document's rules (docs/devel/migration/qatzip-compression.rst, "How To Choose Between QATzip and
QPL"): (1) link-limited and QAT resources exceed IAA's -> qatzip; (2) no SVM on the IAA side ->
qatzip; (3) otherwise qpl. A rule only decides when livemig really drives that accelerator here.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .accel.inventory import Inventory
from .accel.sample import sample_pages
from .compress import create_method, get_method, method_names
from .errors import MethodUnavailable, ParameterError
from .wire.constants import PAGE_SIZE

PAGE = PAGE_SIZE
PACKET_PAGES = 128
#: default candidates: each method at QEMU's default level
#: characters per line of the advise table's backend column (longer text wraps, never cut)
BACKEND_WIDTH = 60
DEFAULT_LEVELS = {"none": 1, "zlib": 1, "zstd": 1, "qatzip": 1, "qpl": 1, "uadk": 1}


@dataclass
class Measurement:
    """One method's codec figures on the sample (rates in page bytes per second)."""

    method: str
    level: int | None
    backend: str
    accelerated: bool
    ratio: float
    compress_rate: float  # one thread, wall clock
    decompress_rate: float
    compress_cpu: float  # CPU seconds per page byte (one thread)
    decompress_cpu: float
    compress_rate_parallel: float  # aggregate of ``threads`` threads
    decompress_rate_parallel: float
    threads: int


@dataclass
class Prediction:
    """What a migration with one method would do on the link."""

    measurement: Measurement
    rate: float  # page bytes/s
    pages_per_second: float
    wire_rate: float  # bytes/s on the wire
    limit: str  # "link", "sender" or "receiver"
    #: the source's codec CPU time per second, x 100 (100 = one core busy; at most 100 x its cores)
    send_cpu_percent: float
    #: the destination's, the same way
    recv_cpu_percent: float


@dataclass
class Advice:
    """The whole answer of ``livemig advise``."""

    bandwidth: int
    channels: int
    cores: int
    sample: str
    sample_bytes: int
    predictions: list[Prediction]
    recommended: str
    recommended_level: int | None
    reason: str
    rules: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return asdict(self)


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
    """Codec figures of ``name`` at ``level`` on ``data`` (see the module docstring).

    The one codec measurement of the project (``livemig advise``, ``livemig bench``'s compute limit,
    ``scripts/codec-speed.py``); ``threads=0`` skips the multi-thread aggregate.
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


def predict(m: Measurement, bandwidth: int, channels: int, cores: int) -> Prediction:
    """Throughput and CPU of a migration with ``m``'s method over a ``bandwidth`` bytes/s link.

    Parallel rates were measured with ``m.threads`` threads; with more channels than that (and more
    cores) they scale by ``min(channels, cores) / m.threads``. ``bandwidth`` 0 means unlimited."""
    usable = min(channels, cores)
    scale = usable / m.threads
    sender = m.compress_rate_parallel * scale
    receiver = m.decompress_rate_parallel * scale
    link = bandwidth * m.ratio if bandwidth else float("inf")
    rate = min(sender, receiver, link)
    limit = "link" if rate == link else ("sender" if rate == sender else "receiver")
    return Prediction(
        measurement=m,
        rate=rate,
        pages_per_second=rate / PAGE,
        wire_rate=rate / m.ratio,
        limit=limit,
        send_cpu_percent=rate * m.compress_cpu * 100,
        recv_cpu_percent=rate * m.decompress_cpu * 100,
    )


def hardware_rules(
    inv: Inventory, link_limited: bool, livemig_drives_iaa: bool = False
) -> tuple[str | None, list[str]]:
    """The feature document's QAT-vs-IAA rules applied to ``inv``: (method or None, notes)."""
    notes: list[str] = []
    qat = inv.qat_usable()
    iaa_wqs = inv.iaa_work_queues()
    iaa = iaa_wqs > 0
    if not qat and not iaa:
        notes.append("no QAT or IAA device in use here: the QATzip-vs-QPL rules do not apply; choice by measurement")
        return None, notes
    if qat and not iaa:
        notes.append(f"QAT present ({len(inv.qat)} function(s)), no IAA work queue: qatzip offloads compression")
        return "qatzip", notes
    if iaa and not qat:
        if livemig_drives_iaa:
            notes.append(f"IAA present ({iaa_wqs} work queue(s)), no QAT: qpl")
            return "qpl", notes
        notes.append("IAA present, but livemig's qpl runs on the CPU (no verified QPL job binding): rule not applied")
        return None, notes
    if link_limited and len(inv.qat) >= iaa_wqs:
        notes.append(
            f"rule 1: link-limited and QAT resources ({len(inv.qat)} functions) >= IAA ({iaa_wqs} work queues): qatzip"
        )
        return "qatzip", notes
    if not inv.iaa_svm():
        notes.append("rule 2: IAA without SVM (PASID off): QPL performs poorly, use qatzip")
        return "qatzip", notes
    if livemig_drives_iaa:
        notes.append("rule 3: otherwise qpl first")
        return "qpl", notes
    notes.append("rule 3 would pick qpl, but livemig's qpl runs on the CPU here: falling back to qatzip on QAT")
    return "qatzip", notes


def recommend(preds: list[Prediction], inv: Inventory | None, bandwidth: int) -> tuple[Prediction, str, list[str]]:
    """The recommended prediction, why, and the hardware rule notes."""
    if not preds:
        raise MethodUnavailable("no compression method could be measured")
    ranked = sorted(preds, key=lambda p: -p.pages_per_second)
    best = ranked[0]
    close = [p for p in ranked if p.pages_per_second >= 0.95 * best.pages_per_second]
    pick = min(close, key=lambda p: p.send_cpu_percent + p.recv_cpu_percent)
    compressing = [p for p in preds if p.measurement.method != "none"]
    link_limited = bool(bandwidth) and any(p.limit == "link" for p in compressing)
    rules: list[str] = []
    if inv is not None:
        rule_pick, rules = hardware_rules(inv, link_limited)
        hw = [p for p in preds if p.measurement.method == rule_pick and p.measurement.accelerated]
        if hw:
            return hw[0], f"hardware rule: {rules[-1]}", rules
    m = pick.measurement
    why = f"highest predicted pages/s ({pick.pages_per_second:,.0f}, {pick.limit}-limited)"
    if pick is not best:
        why += (
            f"; within 5 % of {best.measurement.method} ({best.pages_per_second:,.0f}) at lower CPU "
            f"({(pick.send_cpu_percent + pick.recv_cpu_percent) / 100:.2f} vs "
            f"{(best.send_cpu_percent + best.recv_cpu_percent) / 100:.2f} cores busy, both sides together)"
        )
    if m.method != "none" and not m.accelerated:
        why += "; CPU path (no accelerator in use)"
    return pick, why, rules


def parse_candidates(text: str | None) -> list[tuple[str, int | None]]:
    """``qatzip:1,zstd:3,qpl`` (the ``--methods`` text) -> [(qatzip, 1), (zstd, 3), (qpl, None)].

    None/empty -> every method that runs here at its default level. Raises ParameterError naming
    ``--methods`` for an unknown method or a bad level, MethodUnavailable for a known method that
    cannot run here.
    """
    if not text:
        out: list[tuple[str, int | None]] = []
        for name in method_names():
            try:
                cls = get_method(name)
            except MethodUnavailable:
                continue
            out.append((name, DEFAULT_LEVELS.get(name, 1) if cls.levels else None))
        return out
    result: list[tuple[str, int | None]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, lv = part.partition(":")
        if name not in method_names():
            raise ParameterError(f"--methods: unknown method '{name}' (known: {', '.join(method_names())})")
        cls = get_method(name)
        if cls.levels is None:
            if lv:
                raise ParameterError(f"--methods '{part}': {name} takes no level")
            result.append((name, None))
            continue
        low, high = cls.levels
        if lv and not lv.isdigit():
            raise ParameterError(f"--methods '{part}': level '{lv}' is not a number ({name}: {low} to {high})")
        level = int(lv) if lv else DEFAULT_LEVELS.get(name, low)
        if not low <= level <= high:
            raise ParameterError(
                f"--methods '{part}': multifd-{name}-level expects a value between {low} and {high}"
            )
        result.append((name, level))
    if not result:
        raise ParameterError(f"--methods '{text}': no method named")
    return result


def advise(
    bandwidth: int,
    channels: int,
    sample: str = "corpus",
    sample_bytes: int = 16 << 20,
    candidates: str | None = None,
    cores: int | None = None,
    inventory: Inventory | None = None,
    repeat: int = 2,
) -> Advice:
    """Measure, predict and recommend (see the module docstring).

    ``bandwidth`` bytes/s (0 = unlimited); ``sample`` a guest fill spec (or a :data:`.accel.sample.KINDS`
    kind); ``sample_bytes`` rounded down to whole 512 KiB packets, at least one; ``cores`` per side
    (None = this host's). Raises ParameterError for channels outside 1..255, cores < 1 or bad
    ``candidates``; GuestError for a fill that cannot be produced; MethodUnavailable.
    """
    if channels < 1 or channels > 255:
        raise ParameterError("Parameter 'multifd_channels' expects a value between 1 and 255")
    if cores is not None and cores < 1:
        raise ParameterError(f"cores {cores}: expected 1 or more")
    ncores = cores or os.cpu_count() or 1
    cands = parse_candidates(candidates)
    npages = max(PACKET_PAGES, sample_bytes // PAGE)
    data = sample_pages(npages, sample, seed=0)
    threads = max(1, min(channels, ncores))
    preds = [
        predict(measure(name, level, data, threads, repeat), bandwidth, channels, ncores) for name, level in cands
    ]
    pick, why, rules = recommend(preds, inventory, bandwidth)
    return Advice(
        bandwidth=bandwidth,
        channels=channels,
        cores=ncores,
        sample=sample,
        sample_bytes=len(data),
        predictions=preds,
        recommended=pick.measurement.method,
        recommended_level=pick.measurement.level,
        reason=why,
        rules=rules,
    )


def render(adv: Advice) -> str:
    """The table ``livemig advise`` prints.

    The CPU columns are each side's codec CPU as a share of that side's ``adv.cores`` cores.
    """
    from .units import format_rate_bits

    bw = format_rate_bits(adv.bandwidth) if adv.bandwidth else "unlimited"
    cores = f"of {adv.cores} core" + ("s" if adv.cores > 1 else "")
    lines = [
        f"link {bw}, {adv.channels} multifd channels, {adv.cores} cores on each side; sample: {adv.sample}, "
        f"{adv.sample_bytes >> 20} MiB in 512 KiB packets",
        f"{'method':10} {'comp MB/s':>9} {'dec MB/s':>9} {'ratio':>6} {'pages/s':>10} {'limit':>8} "
        f"{'wire':>11} {'send CPU':>10} {'recv CPU':>10}  backend",
        f"{'':10} {'(1 core)':>9} {'(1 core)':>9} {'':>6} {'':>10} {'':>8} {'':>11} {cores:>10} {cores:>10}",
    ]
    lines.append("-" * len(lines[1]))
    for p in adv.predictions:
        m = p.measurement
        name = m.method if m.level is None or m.method == "none" else f"{m.method}-{m.level}"
        row = (
            f"{name:10} {m.compress_rate / 1e6:9.0f} {m.decompress_rate / 1e6:9.0f} {m.ratio:6.2f} "
            f"{p.pages_per_second:10,.0f} {p.limit:>8} {format_rate_bits(p.wire_rate):>11} "
            f"{p.send_cpu_percent / adv.cores:9.0f}% {p.recv_cpu_percent / adv.cores:9.0f}%  "
        )
        # the backend, whole: wrapped at word boundaries below its own column
        wrapped = textwrap.wrap(m.backend, BACKEND_WIDTH, break_on_hyphens=False) or [""]
        lines.append(row + wrapped[0])
        lines += [" " * len(row) + more for more in wrapped[1:]]
    lines.append(
        f"(MB/s: one core; pages/s with min(channels, cores) threads per side; send/recv CPU: the codec's CPU"
        f" time on the source / destination as a share of that side's {adv.cores} cores, 100% = all busy)"
    )
    for note in adv.rules:
        lines.append(f"hardware: {note}")
    level = "" if adv.recommended_level is None or adv.recommended == "none" else f" level {adv.recommended_level}"
    lines.append(f"recommended: {adv.recommended}{level}: {adv.reason}")
    return "\n".join(lines)
