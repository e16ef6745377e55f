"""``multifd-compression auto``: pick, at setup, the method and level that should finish first.

``auto`` is livemig's own value (QEMU has no such method): the source resolves it before any RAM
moves, then sends an ordinary stream of the picked method (its name in ``livemig/config``, its flag
in every multifd packet, its payload format), so the destination needs only that method; a livemig
destination set to ``auto`` accepts whichever method the source picked.

How it picks (:func:`choose`):

* **sample**: :data:`SAMPLE_RUNS` runs of :data:`RUN_PAGES` contiguous pages spread evenly over all
  of guest RAM (256 pages); all-zero pages are counted and left out (multifd zero-page detection
  lists them without a payload, docs/wire.md, "Multifd packet"); the other pages are compressed with
  each candidate, giving its ratio on this guest's data;
* **speed**: each candidate's compress and decompress speed with as many threads at once as cores,
  and the socket copy with as many Unix socket pairs (:mod:`livemig.accel.speed`; not TCP: lo may
  be shaped, as the bench's ``--link-rate`` does), measured on the first guest's sample and kept
  across processes for a day (:func:`host_speeds`, :mod:`livemig.accel.cache`): after the first
  run on a host, setup reads them instead of measuring; the reason says which;
* **link**: ``max-bandwidth`` when set, else the link's rate (a ``tc`` ``tbf`` rate on the route's
  device, or the device's speed from sysfs; :func:`link_rate`), else none;
* **model**: :func:`livemig.accel.speed.finish_time` for the guest's non-zero bytes with the
  channel count and cores, both ends sharing this host's cores when the destination is local
  (a loopback or unix: address); the shortest predicted time wins (within 3 %, the one with less
  codec work: ``none`` before any codec, then the lower level).

Candidates (:data:`CANDIDATES`): none, zstd 1 and 3, qatzip 1, and every other method whose backend
is hardware. The CPU paths of zlib, qpl and uadk are left out: they compress less and more slowly
than zstd or qatzip's CPU path on every sample measured here, and measuring them would double the
setup time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MethodUnavailable
from ..units import format_rate_bits, format_size
from ..wire.constants import PAGE_SIZE
from . import create_method, get_method, method_names

#: the value of ``multifd-compression`` that makes the source choose
AUTO = "auto"
#: (method, level) tried on every host; level None for methods without one
CANDIDATES: tuple[tuple[str, int | None], ...] = (("none", None), ("zstd", 1), ("zstd", 3), ("qatzip", 1))
#: methods tried only when their backend is hardware (at their default level)
HARDWARE_ONLY: tuple[tuple[str, int | None], ...] = (("zlib", 1), ("qpl", None), ("uadk", None), ("qatzip", 1))
SAMPLE_RUNS = 32
RUN_PAGES = 8
#: bytes of the built-in corpus the host speeds are measured on when a sample has no data (one packet)
REFERENCE_BYTES = 128 * PAGE_SIZE
#: two predictions this close (relative) count as a tie
TIE = 0.03

_lock = threading.Lock()
_speeds: dict[tuple[str, int | None, int], Any] = {}
_loop: dict[int, float] = {}
#: (method, level, cores) -> age in seconds of the cached speed used, None when measured here
_origin: dict[tuple[str, int | None, int], float | None] = {}


def candidates() -> list[tuple[str, int | None]]:
    """The (method, level) pairs ``auto`` compares on this host (see the module docstring)."""
    out: list[tuple[str, int | None]] = []
    for name, level in CANDIDATES:
        try:
            get_method(name)
        except MethodUnavailable:
            continue
        out.append((name, level))
    for name, level in HARDWARE_ONLY:
        try:
            hw = create_method(name, level or 1).accelerated()
        except MethodUnavailable:
            continue
        if hw and (name, level) not in out:
            out.append((name, level))
    return out


def host_speeds(cands: Sequence[tuple[str, int | None]], cores: int,
                data: bytes) -> tuple[dict[tuple[str, int | None], Any], float]:
    """({(method, level): Measurement with ``cores`` threads at once}, all-cores socket bytes/s).

    Each is taken from the host's speed cache (:mod:`livemig.accel.cache`: across processes, at
    most a day old) or else measured the first time this process asks for it, on the first 512 KiB
    of ``data`` (the first guest's sampled pages; the built-in corpus when that sample has none),
    best of 2 (~0.1-0.4 s on a 2-core host), and stored there; then kept for the process.
    :func:`speed_origin` says which."""
    from ..accel import cache
    from ..accel.sample import synthetic_corpus
    from ..accel.speed import measure, measure_loopback

    with _lock:
        for name, level in cands:
            if (name, level, cores) in _speeds:
                continue
            backend = create_method(name, level or 1).backend()
            hit = cache.measurement(name, level, backend, cores)
            if hit is not None:
                _speeds[(name, level, cores)], _origin[(name, level, cores)] = hit[0], hit[1]
                continue
            usable = min(len(data) - len(data) % PAGE_SIZE, REFERENCE_BYTES)
            ref = data[:usable] or synthetic_corpus(REFERENCE_BYTES)
            m = measure(name, level, ref, threads=cores, repeat=2)
            _speeds[(name, level, cores)], _origin[(name, level, cores)] = m, None
            cache.store_measurement(m)
        if cores not in _loop:
            rate = cache.socket_rate(cores)
            if rate is None:
                # Unix socket pairs: nothing on lo, which a tc qdisc may shape (the bench's --link-rate)
                _loop[cores] = max(measure_loopback(8 << 20, cores, tcp=False).all_bps for _ in range(2))
                cache.store_socket_rate(cores, _loop[cores])
            else:
                _loop[cores] = rate[0]
        return {c: _speeds[(*c, cores)] for c in cands}, _loop[cores]


def speed_origin(cands: Sequence[tuple[str, int | None]], cores: int) -> str:
    """Where :func:`host_speeds` took the speeds of ``cands`` from, for the choice's reason:
    "measured now", "cached N min ago (FILE)" or both ('' when it was not asked)."""
    from ..accel import cache

    ages = [_origin[(*c, cores)] for c in cands if (*c, cores) in _origin]
    if not ages:
        return ""
    cached = [a for a in ages if a is not None]
    if not cached:
        return "codec speeds measured now"
    what = f"codec speeds cached {max(cached) / 60:.0f} min ago ({cache.path()})"
    return what if len(cached) == len(ages) else f"{what}, the others measured now"


def sample_guest(views: Sequence[memoryview], zero_pages_free: bool,
                 runs: int = SAMPLE_RUNS, run_pages: int = RUN_PAGES) -> tuple[bytes, int, int]:
    """(the sampled pages that need a payload, joined; pages sampled; zero pages among them).

    ``runs`` runs of ``run_pages`` pages at evenly spaced page numbers over all blocks in order
    (fewer when RAM is smaller). With ``zero_pages_free`` all-zero pages are counted, not kept."""
    sizes = [v.nbytes // PAGE_SIZE for v in views]
    total = sum(sizes)
    if total == 0:
        return b"", 0, 0
    run_pages = min(run_pages, total)
    starts = sorted({min(total - run_pages, i * total // runs) for i in range(runs)})
    kept: list[bytes] = []
    seen = zeros = 0
    zero = bytes(PAGE_SIZE)
    for start in starts:
        for page in range(start, start + run_pages):
            b, k = 0, page
            while k >= sizes[b]:
                k -= sizes[b]
                b += 1
            data = bytes(views[b][k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
            seen += 1
            if zero_pages_free and data == zero:
                zeros += 1
                continue
            kept.append(data)
    return b"".join(kept), seen, zeros


def guest_ratio(name: str, level: int | None, data: bytes) -> float:
    """Page bytes / payload bytes of ``data`` sent by ``name`` at ``level`` in multifd packets."""
    if not data or name == "none":
        return 1.0
    comp = create_method(name, level or 1).compressor(0)
    step = 128 * PAGE_SIZE
    mv = memoryview(data)
    wire = sum(sum(memoryview(b).nbytes for b in comp.compress([mv[i : i + step]])) for i in range(0, len(data), step))
    return len(data) / max(1, wire)


def link_rate(host: str | None) -> tuple[int, str]:
    """(bytes/s, where it comes from) of the link towards ``host`` (None or a unix: address: loopback).

    The route's device (``ip -j route get``); on it, a ``tc`` ``tbf`` qdisc's rate if one is set,
    else the device's speed (``/sys/class/net/DEV/speed``, Mbit/s). (0, "") when neither is known."""
    try:
        dev = "lo"
        if host:
            ip = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
            out = subprocess.run(["ip", "-j", "route", "get", str(ip)], capture_output=True, text=True, timeout=2)
            dev = json.loads(out.stdout)[0]["dev"]
        out = subprocess.run(["tc", "-j", "qdisc", "show", "dev", dev], capture_output=True, text=True, timeout=2)
        rates = [int(q["options"]["rate"]) for q in json.loads(out.stdout or "[]")
                 if q.get("kind") == "tbf" and q.get("options", {}).get("rate")]
        if rates:
            return min(rates), f"tc tbf on {dev}"
        mbit = int(Path(f"/sys/class/net/{dev}/speed").read_text().strip())
        if mbit > 0:
            return mbit * 125_000, f"{dev} link speed"
    except (OSError, ValueError, KeyError, IndexError, TypeError, subprocess.SubprocessError):
        pass
    return 0, ""


@dataclass
class Choice:
    """What ``auto`` picked and why (``query-migrate``'s ``livemig.auto``)."""

    method: str
    level: int | None
    reason: str
    #: bytes/s the model used (0 = none) and where it came from
    cap: int
    cap_source: str
    channels: int
    cores: int
    same_host: bool
    sample_pages: int
    zero_pages: int
    #: milliseconds the choice took (sample, measurements, model)
    choose_ms: float
    #: every candidate: method, level, ratio, predicted-ms, limit
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return _label(self.method, self.level)

    def to_json(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def _label(name: str, level: int | None) -> str:
    return name if level is None else f"{name}-{level}"


def choose(views: Sequence[memoryview], ram: int, channels: int, max_bandwidth: int, *, same_host: bool,
           host: str | None = None, zero_pages_free: bool = True, cores: int | None = None) -> Choice:
    """Pick the method and level predicted to move ``ram`` bytes (guest RAM in ``views``) first.

    ``max_bandwidth`` bytes/s (0 = unlimited: the link's rate towards ``host`` is used when known);
    ``same_host``: both ends on this host. Raises MethodUnavailable only if no candidate runs."""
    from ..accel.speed import finish_time

    t0 = time.perf_counter()
    ncores = cores or os.cpu_count() or 1
    cands = candidates()
    if not cands:
        raise MethodUnavailable("multifd-compression auto: no compression method can run here")
    data, seen, zeros = sample_guest(views, zero_pages_free)
    speeds, loop_bps = host_speeds(cands, ncores, data)
    cap, cap_source = (max_bandwidth, "max-bandwidth") if max_bandwidth > 0 else link_rate(host)
    nonzero = ram * (1 - zeros / seen) if seen else float(ram)
    rows: list[dict[str, Any]] = []
    for name, level in cands:
        m = dataclasses.replace(speeds[(name, level)], ratio=guest_ratio(name, level, data))
        f = finish_time(m, loop_bps, nonzero, cap, channels, ncores, same_host)
        rows.append({"method": name, "level": level, "ratio": round(m.ratio, 3),
                     "predicted-ms": round(f.seconds * 1000, 1), "limit": f.limit})
    origin = speed_origin(cands, ncores)
    best = min(r["predicted-ms"] for r in rows)
    # ties go to the least codec work: the candidates are listed cheapest first within a method
    pick = next(r for r in rows if r["predicted-ms"] <= best * (1 + TIE))
    link = (f"link {format_rate_bits(cap)} ({cap_source})" if cap else "no link limit known")
    others = ", ".join(f"{_label(r['method'], r['level'])} {r['predicted-ms'] / 1000:.2f} s"
                       for r in rows if r is not pick)
    reason = (f"predicted {pick['predicted-ms'] / 1000:.2f} s for {format_size(ram)} ({pick['limit']}-limited; "
              f"ratio {pick['ratio']:.2f} on {seen} sampled pages, {zeros} zero; {link}; "
              f"{channels} channels, {ncores} cores{', shared by both ends' if same_host else ' per side'}"
              f"{'; ' + origin if origin else ''}); "
              f"{_tie(pick, rows, best)}others: {others or 'none'}")
    return Choice(pick["method"], pick["level"], reason, cap, cap_source, channels, ncores, same_host, seen,
                  zeros, round((time.perf_counter() - t0) * 1000, 1), rows)


def _tie(pick: dict[str, Any], rows: list[dict[str, Any]], best: float) -> str:
    """Why the pick is not the shortest prediction, when it is not ('' when it is)."""
    if pick["predicted-ms"] <= best:
        return ""
    fastest = next(r for r in rows if r["predicted-ms"] == best)
    return (f"a tie with {_label(fastest['method'], fastest['level'])} ({best / 1000:.2f} s, within "
            f"{TIE:.0%}), which does more codec work; ")


def accepted() -> list[str]:
    """Every value ``multifd-compression`` accepts: the methods and ``auto``."""
    return [*method_names(), AUTO]
