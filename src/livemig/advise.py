"""``livemig advise``: which multifd compression method suits this host and link.

For each method that can run here (at its default level; more with ``candidates``),
:func:`.accel.speed.measure` compresses and decompresses a sample of guest pages (the built-in
``corpus`` fill by default) in 512 KiB packets through the same per-channel objects the migration
uses, on one thread and then on as many threads at once as there are cores (all cores busy: two
busy threads are not twice one), and :func:`.accel.speed.measure_loopback` times loopback TCP the
same way. :func:`predict` turns that into a throughput with :func:`.accel.speed.finish_time`, the
model the bench's limit column and ``multifd-compression auto`` use::

    time     = finish_time(speeds, RAM, link, channels, cores, same host or two hosts)
    rate     = RAM / time;   pages/s = rate / 4096;   wire rate = rate / ratio
    CPU % per side = rate x (codec CPU seconds per page byte) x 100   (100 % = one core busy)

``same_host`` (``livemig advise --local``) is what ``livemig migrate --local`` and ``livemig bench``
run: both ends share this host's cores. Otherwise source and destination are separate hosts with
``cores`` cores each. A hardware backend shows as low CPU time per byte, so the same formulas hold for QAT.

:func:`recommend` picks the method with the highest predicted pages/s, preferring the lower total
CPU % when two are within 5 %. When accelerators are present it first applies the QEMU feature
document's rules (docs/devel/migration/qatzip-compression.rst, "How To Choose Between QATzip and
QPL"): (1) link-limited and QAT resources exceed IAA's -> qatzip; (2) no SVM on the IAA side ->
qatzip; (3) otherwise qpl. A rule only decides when livemig really drives that accelerator here.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

from .accel import cache
from .accel.inventory import Inventory
from .accel.sample import sample_pages
from .accel.speed import PACKET_PAGES, Measurement, finish_time, measure, measure_loopback
from .compress import get_method, method_names
from .errors import MethodUnavailable, ParameterError
from .wire.constants import PAGE_SIZE

PAGE = PAGE_SIZE
#: RAM the predictions are made for (rates do not depend on it; the model has no fixed cost)
MODEL_RAM = 1 << 30
__all__ = ["PACKET_PAGES", "Advice", "Measurement", "Prediction", "advise", "measure", "predict", "recommend"]
#: default candidates: each method at QEMU's default level
#: characters per line of the advise table's backend column (longer text wraps, never cut)
BACKEND_WIDTH = 60
DEFAULT_LEVELS = {"none": 1, "zlib": 1, "zstd": 1, "qatzip": 1, "qpl": 1, "uadk": 1}


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
    #: both ends on this host, sharing its cores (``--local``)
    same_host: bool = False
    #: loopback TCP bytes/s with all cores busy (0 = not measured)
    loopback_bps: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        return asdict(self)


def predict(m: Measurement, bandwidth: int, channels: int, cores: int, same_host: bool = False,
            loop_bps: float = 0.0) -> Prediction:
    """Throughput and CPU of a migration with ``m``'s method over a ``bandwidth`` bytes/s link
    (0 = unlimited), by :func:`.accel.speed.finish_time`; ``loop_bps`` the all-cores loopback rate
    (0 = socket cost not counted)."""
    f = finish_time(m, loop_bps, MODEL_RAM, bandwidth, channels, cores, same_host)
    rate = MODEL_RAM / f.seconds if f.seconds > 0 else float("inf")
    return Prediction(
        measurement=m,
        rate=rate,
        pages_per_second=rate / PAGE,
        wire_rate=rate / m.ratio,
        limit=f.limit,
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
    same_host: bool = False,
) -> Advice:
    """Measure, predict and recommend (see the module docstring).

    ``bandwidth`` bytes/s (0 = unlimited); ``sample`` a guest fill spec (or a :data:`.accel.sample.KINDS`
    kind); ``sample_bytes`` rounded down to whole 512 KiB packets, at least one; ``cores`` per side
    (None = this host's; codecs run on at most this host's cores at once, the model scales beyond);
    ``same_host``: both ends share this host (``livemig migrate --local``, ``livemig bench``).
    Raises ParameterError for channels outside 1..255, cores < 1 or bad ``candidates``; GuestError
    for a fill that cannot be produced; MethodUnavailable.
    """
    if channels < 1 or channels > 255:
        raise ParameterError("Parameter 'multifd_channels' expects a value between 1 and 255")
    if cores is not None and cores < 1:
        raise ParameterError(f"cores {cores}: expected 1 or more")
    ncores = cores or os.cpu_count() or 1
    cands = parse_candidates(candidates)
    npages = max(PACKET_PAGES, sample_bytes // PAGE)
    data = sample_pages(npages, sample, seed=0)
    threads = max(1, min(ncores, os.cpu_count() or 1))  # all cores busy
    loop = measure_loopback(connections=threads)
    measured = [measure(name, level, data, threads, repeat) for name, level in cands]
    for m in measured:  # later ``multifd-compression auto`` setups reuse them
        cache.store_measurement(m)
    preds = [predict(m, bandwidth, channels, ncores, same_host, loop.all_bps) for m in measured]
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
        same_host=same_host,
        loopback_bps=loop.all_bps,
    )


def render(adv: Advice) -> str:
    """The table ``livemig advise`` prints.

    The CPU columns are each side's codec CPU as a share of that side's ``adv.cores`` cores.
    """
    from .units import format_rate_bits

    bw = format_rate_bits(adv.bandwidth) if adv.bandwidth else "unlimited"
    cores = f"of {adv.cores} core" + ("s" if adv.cores > 1 else "")
    threads = adv.predictions[0].measurement.threads if adv.predictions else 1
    where = (f"both ends on this host sharing its {adv.cores} cores" if adv.same_host
             else f"{adv.cores} cores on each side")
    lines = [
        f"link {bw}, {adv.channels} multifd channels, {where}; sample: {adv.sample}, "
        f"{adv.sample_bytes >> 20} MiB in 512 KiB packets",
        f"{'method':10} {'comp MB/s':>9} {'dec MB/s':>9} {'ratio':>6} {'pages/s':>10} {'limit':>8} "
        f"{'wire':>11} {'send CPU':>10} {'recv CPU':>10}  backend",
        f"{'':10} {f'({threads} thr)':>9} {f'({threads} thr)':>9} {'':>6} {'':>10} {'':>8} {'':>11} "
        f"{cores:>10} {cores:>10}",
    ]
    lines.append("-" * len(lines[1]))
    for p in adv.predictions:
        m = p.measurement
        name = m.method if m.level is None or m.method == "none" else f"{m.method}-{m.level}"
        row = (
            f"{name:10} {m.compress_rate_parallel / 1e6:9.0f} {m.decompress_rate_parallel / 1e6:9.0f} {m.ratio:6.2f} "
            f"{p.pages_per_second:10,.0f} {p.limit:>8} {format_rate_bits(p.wire_rate):>11} "
            f"{p.send_cpu_percent / adv.cores:9.0f}% {p.recv_cpu_percent / adv.cores:9.0f}%  "
        )
        # the backend, whole: wrapped at word boundaries below its own column
        wrapped = textwrap.wrap(m.backend, BACKEND_WIDTH, break_on_hyphens=False) or [""]
        lines.append(row + wrapped[0])
        lines += [" " * len(row) + more for more in wrapped[1:]]
    lines.append(
        f"(MB/s: {threads} threads at once, all cores busy; pages/s from livemig.accel.speed.finish_time"
        f"{f', loopback {adv.loopback_bps / 1e6:.0f} MB/s' if adv.loopback_bps else ''}; send/recv CPU: the codec's CPU"
        f" time on the source / destination as a share of that side's {adv.cores} cores, 100% = all busy)"
    )
    for note in adv.rules:
        lines.append(f"hardware: {note}")
    level = "" if adv.recommended_level is None or adv.recommended == "none" else f" level {adv.recommended_level}"
    lines.append(f"recommended: {adv.recommended}{level}: {adv.reason}")
    return "\n".join(lines)
