"""Migration statistics: one object, rendered as ``query-migrate``, as progress and as a table.

Definitions follow QEMU 10.2 (docs/wire.md, "Statistics"), with these choices written down:

* ``transferred`` = bytes written on the main channel + ``multifd-bytes`` (bytes really written on
  the multifd sockets: the 64-byte handshakes, packet headers and compressed payloads).
* ``mbps`` = bytes written (main channel + multifd) while ``active`` x 8 / the time spent active, in
  Mbit/s: the rate of the iterative (capped) phase, as QEMU's own mbps is an iteration rate. The
  setup handshakes and first SYNC round, and the uncapped switchover (the guest paused), are
  excluded, so under ``max-bandwidth`` the figure is what the cap allowed. While active: bytes since
  active began over the time since; 0 when no RAM moved (a migration that failed in setup).
* ``pages-per-second`` = (normal + duplicate) pages / (total-time - setup-time): the whole-migration
  average (QEMU shows its last 100 ms window instead).
* ``precopy-bytes`` / ``downtime-bytes`` = main-channel RAM-section bytes while the guest ran / was
  stopped (QEMU's definition: multifd excluded).
* ``send-cpu-percent`` / ``recv-cpu-percent`` = that side's process CPU time (user + system) over
  the migration's wall time, x 100 (200 % = both cores of this machine).
* ``send-mem-bytes`` / ``recv-mem-bytes`` = peak anonymous memory of the process during the
  migration above what it used before (guest RAM lives in a memfd and is not counted).
* ``compression-ratio`` = normal-bytes / multifd payload bytes.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from ..units import format_rate_bits, format_size, plural
from ..wire.constants import PAGE_SIZE


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def anon_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon), in bytes."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def downtime_phases(t0: float, marks: list[tuple[str, float]]) -> dict[str, float]:
    """Milliseconds spent in each downtime phase, in order: ``marks`` are (phase name, monotonic
    time it ended), ``t0`` when the first began."""
    out: dict[str, float] = {}
    prev = t0
    for name, t in marks:
        out[name] = round((t - prev) * 1000, 2)
        prev = t
    return out


#: guest RAM a destination leaves to the host: this much at least ...
HOST_MARGIN_MIN = 256 << 20
#: ... or this fraction of what is available, whichever is more
HOST_MARGIN_FRACTION = 0.1


def host_memory_limit() -> int:
    """Bytes of guest RAM this host can give a guest now: ``MemAvailable`` (``/proc/meminfo``, kB)
    minus a margin (:data:`HOST_MARGIN_MIN` or :data:`HOST_MARGIN_FRACTION` of it, the larger;
    0 if less is available). Without ``/proc/meminfo``: physical RAM (``sysconf``) minus the margin."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not avail:
        avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(0, avail - max(HOST_MARGIN_MIN, int(avail * HOST_MARGIN_FRACTION)))


class ResourceMeter:
    """CPU time and peak anonymous memory of this process between start() and now."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = cpu_seconds()
        self.mem0 = anon_bytes()
        self.peak = self.mem0

    def start(self) -> None:
        self.__init__()  # type: ignore[misc]

    def sample(self) -> None:
        self.peak = max(self.peak, anon_bytes())

    def cpu_percent(self) -> float:
        wall = time.monotonic() - self.t0
        return 100.0 * (cpu_seconds() - self.cpu0) / wall if wall > 0 else 0.0

    def mem_bytes(self) -> int:
        self.sample()
        return max(0, self.peak - self.mem0)


@dataclass
class ChannelCounters:
    """Counters one channel thread updates (no lock: one writer each; readers sum)."""

    packets: int = 0
    normal: int = 0
    zero: int = 0
    wire_bytes: int = 0
    payload_bytes: int = 0
    #: thread CPU seconds spent in the compression method (compress or decompress)
    codec_seconds: float = 0.0


@dataclass
class MigrationStats:
    """Everything query-migrate reports on the source, plus livemig's own figures."""

    status: str = "none"
    error: str = ""
    start: float = field(default_factory=time.monotonic)
    setup_time_ms: float = 0.0
    total_time_ms: float = 0.0
    downtime_ms: float = 0.0
    #: milliseconds per switchover phase (pause, sync, send, save state, digest, destination resumed)
    downtime_phases: dict[str, float] = field(default_factory=dict)
    expected_downtime_ms: float = 0.0
    ram_total: int = 0
    remaining: int = 0
    page_size: int = PAGE_SIZE
    main_bytes: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    passes: int = 0
    channels: list[ChannelCounters] = field(default_factory=list)
    #: monotonic time the ``active`` phase began / ended (0 = not yet) and ``transferred`` then
    active_start: float = 0.0
    active_end: float = 0.0
    active_bytes_start: int = 0
    active_bytes_end: int = 0
    # livemig's own
    method: str = "none"
    #: the method's level; None for a method without levels (none, qpl, uadk)
    level: int | None = None
    backend: str = ""
    accelerated: bool = False
    max_bandwidth: int = 0
    send_cpu_percent: float = 0.0
    recv_cpu_percent: float = 0.0
    send_mem_bytes: int = 0
    recv_mem_bytes: int = 0
    guest: dict[str, Any] = field(default_factory=dict)
    destination: dict[str, Any] = field(default_factory=dict)
    #: the handover's state at the end (livemig.migration.protocol: completed, unknown, failed, ...)
    handover: str = "running"
    #: what the source guest does: running, paused or postmigrate (QEMU's run states)
    source_guest: str = "running"
    #: what the operator must know (a cancel answered too late, an unknown outcome)
    notes: list[str] = field(default_factory=list)
    #: capability auto-converge; the vCPU throttle now (0 = off), the highest it reached, and the
    #: seconds it held each vCPU (on average) during the migration
    auto_converge: bool = False
    cpu_throttle_percentage: int = 0
    cpu_throttle_peak: int = 0
    cpu_throttle_held_s: float = 0.0
    #: post-copy (capability ``postcopy-ram``): page requests received from the destination, bytes
    #: of RAM records written on the main channel in post-copy (QEMU's ``postcopy-requests`` and
    #: ``postcopy-bytes``), and livemig's figures once it switched (see :meth:`to_qapi`)
    postcopy_ram: bool = False
    postcopy_requests: int = 0
    postcopy_bytes: int = 0
    postcopy: dict[str, Any] | None = None
    #: ``multifd-compression auto``: what it picked and why (livemig.compress.auto.Choice.to_json)
    auto: dict[str, Any] = field(default_factory=dict)

    # --- sums over channels ----------------------------------------------------------------------
    @property
    def normal(self) -> int:
        return sum(c.normal for c in self.channels)

    @property
    def duplicate(self) -> int:
        return sum(c.zero for c in self.channels)

    @property
    def multifd_bytes(self) -> int:
        return sum(c.wire_bytes for c in self.channels)

    @property
    def payload_bytes(self) -> int:
        return sum(c.payload_bytes for c in self.channels)

    @property
    def codec_seconds(self) -> float:
        return sum(c.codec_seconds for c in self.channels)

    @property
    def transferred(self) -> int:
        return self.main_bytes + self.multifd_bytes

    def elapsed_ms(self) -> float:
        if self.total_time_ms:
            return self.total_time_ms
        return (time.monotonic() - self.start) * 1000.0

    def _active_s(self) -> float:
        return max(1e-9, (self.elapsed_ms() - self.setup_time_ms) / 1000.0)

    def begin_active(self) -> None:
        """The iterative phase begins now (status ``active``)."""
        self.active_start, self.active_bytes_start = time.monotonic(), self.transferred

    def end_active(self) -> None:
        """The iterative phase ends now (switchover, or a failure while active); once only."""
        if self.active_start and not self.active_end:
            self.active_end, self.active_bytes_end = time.monotonic(), self.transferred

    def active_bytes(self) -> int:
        """Bytes written (main channel + multifd) during the active phase so far."""
        if not self.active_start:
            return 0
        return (self.active_bytes_end if self.active_end else self.transferred) - self.active_bytes_start

    def active_seconds(self) -> float:
        """Seconds spent in the active phase so far."""
        if not self.active_start:
            return 0.0
        return (self.active_end or time.monotonic()) - self.active_start

    def mbps(self) -> float:
        """The active phase's rate in Mbit/s (see the module doc); 0 when no RAM moved."""
        seconds = self.active_seconds()
        if self.normal + self.duplicate == 0 or seconds <= 0:
            return 0.0
        return self.active_bytes() * 8 / seconds / 1e6

    def pages_per_second(self) -> float:
        return (self.normal + self.duplicate) / self._active_s()

    def compression_ratio(self) -> float:
        payload = self.payload_bytes
        return self.normal * self.page_size / payload if payload else 0.0

    # --- renderings ------------------------------------------------------------------------------
    def to_qapi(self) -> dict[str, Any]:
        """query-migrate-shaped dict (source side) with livemig's figures under ``livemig``."""
        out: dict[str, Any] = {"status": self.status}
        if self.status == "failed" or self.error:
            out["error-desc"] = self.error
        if self.status in ("none", "setup"):
            return self._with_livemig(out)
        out["total-time"] = round(self.elapsed_ms())
        out["setup-time"] = round(self.setup_time_ms)
        if self.status == "completed":
            out["downtime"] = round(self.downtime_ms)
        else:
            out["expected-downtime"] = round(self.expected_downtime_ms)
        out["ram"] = {
            "transferred": self.transferred,
            "remaining": 0 if self.status == "completed" else self.remaining,
            "total": self.ram_total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * self.page_size,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps(), 2),
            "pages-per-second": round(self.pages_per_second()),
            "dirty-sync-count": self.dirty_sync_count,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "postcopy-requests": self.postcopy_requests,
            "multifd-bytes": self.multifd_bytes,
            "page-size": self.page_size,
        }
        if self.cpu_throttle_percentage:  # as QEMU: only while the throttle is on
            out["cpu-throttle-percentage"] = self.cpu_throttle_percentage
        return self._with_livemig(out)

    def _with_livemig(self, out: dict[str, Any]) -> dict[str, Any]:
        out["livemig"] = {
            "method": self.method,
            "level": self.level,
            "backend": self.backend,
            "accelerated": self.accelerated,
            "channels": len(self.channels),
            "max-bandwidth": self.max_bandwidth,
            "wire-bytes": self.transferred,
            "compression-ratio": round(self.compression_ratio(), 3),
            "send-cpu-percent": round(self.send_cpu_percent, 1),
            "recv-cpu-percent": round(self.recv_cpu_percent, 1),
            "send-codec-cpu-s": round(self.codec_seconds, 3),
            "send-mem-bytes": self.send_mem_bytes,
            "recv-mem-bytes": self.recv_mem_bytes,
            "passes": self.passes,
            "downtime-phases": self.downtime_phases,
            "guest": self.guest,
            "handover": self.handover,
            "source-guest": self.source_guest,
        }
        if self.auto_converge:
            out["livemig"]["auto-converge"] = {"cpu-throttle-peak": self.cpu_throttle_peak,
                                               "cpu-throttle-held-s": round(self.cpu_throttle_held_s, 3)}
        if self.postcopy is not None:
            # {"time-ms", "pages-requested", "faults", "fault-latency-us": {"p50", "p99"}, "verified"}
            out["livemig"]["postcopy"] = self.postcopy
        if self.notes:
            out["livemig"]["notes"] = list(self.notes)
        if self.auto:
            out["livemig"]["auto"] = self.auto
        if self.destination:
            out["destination"] = self.destination
        return out

    def progress_line(self) -> str:
        """One line for the live progress display (in post-copy: the pages the destination asked for)."""
        line = (
            f"{self.status:<10} pass {self.passes:<3} transferred {format_size(self.transferred):>11}"
            f"  remaining {format_size(self.remaining):>11}  rate {format_rate_bits(self.mbps() * 1e6 / 8):>12}"
            f"  {self.pages_per_second():>10.0f} pages/s"
        )
        if self.status.startswith("postcopy"):
            line += f"  requests {self.postcopy_requests}"
        return line

    def table(self) -> str:
        """The end-of-migration statistics, as ``info migrate`` prints them."""
        return info_table(self.to_qapi())

    @classmethod
    def from_qapi(cls, q: dict[str, Any]) -> MigrationStats:
        """A view of a ``query-migrate`` answer (:meth:`to_qapi`'s shape, e.g. from a ``livemig vm``
        over QMP) for the progress display: counters as reported, the channels' sums in one
        channel, ``mbps()`` the reported rate."""
        ram, lm = q.get("ram", {}), q.get("livemig", {})
        multifd = ram.get("multifd-bytes", 0)
        s = cls(status=q.get("status", "none"), error=q.get("error-desc", ""),
                setup_time_ms=q.get("setup-time", 0), total_time_ms=q.get("total-time", 0),
                downtime_ms=q.get("downtime", 0), expected_downtime_ms=q.get("expected-downtime", 0),
                ram_total=ram.get("total", 0), remaining=ram.get("remaining", 0),
                page_size=ram.get("page-size", PAGE_SIZE), main_bytes=ram.get("transferred", 0) - multifd,
                dirty_sync_count=ram.get("dirty-sync-count", 0), dirty_pages_rate=ram.get("dirty-pages-rate", 0),
                passes=lm.get("passes", 0), handover=lm.get("handover", "running"),
                source_guest=lm.get("source-guest", "running"))
        s.channels = [ChannelCounters(normal=ram.get("normal", 0), zero=ram.get("duplicate", 0), wire_bytes=multifd)]
        s.active_start, s.active_end, s.active_bytes_end = 1.0, 2.0, round(ram.get("mbps", 0) * 1e6 / 8)
        s.cpu_throttle_percentage = q.get("cpu-throttle-percentage", 0)
        s.postcopy_requests, s.postcopy_bytes = ram.get("postcopy-requests", 0), ram.get("postcopy-bytes", 0)
        s.postcopy = lm.get("postcopy")
        return s


def info_table(q: dict[str, Any]) -> str:
    """The end-of-migration statistics of a ``query-migrate`` answer with livemig's figures
    (:meth:`MigrationStats.to_qapi`), as ``info migrate`` prints them."""
    status, error = q["status"], q.get("error-desc", "")
    ram = q.get("ram", {})
    lm = q["livemig"]
    level = "" if lm["level"] is None else f" (level {lm['level']})"
    lines = [f"Migration status: {status}" + (f" ({error})" if error else "")]
    if status in ("failed", "cancelled"):
        return "\n".join(lines + [
            f"after: {q.get('total-time', 0)} ms, {ram.get('transferred', 0) // 1024} kbytes transferred",
            f"source guest: {lm['source-guest']} (handover {lm['handover']})",
        ])
    if ram:
        lines += [
            f"total time: {q['total-time']} ms",
            f"downtime: {q.get('downtime', q.get('expected-downtime'))} ms",
            f"setup: {q['setup-time']} ms",
            f"transferred ram: {ram['transferred'] // 1024} kbytes",
            f"throughput: {ram['mbps']:.2f} mbps",
            f"remaining ram: {ram['remaining'] // 1024} kbytes",
            f"total ram: {ram['total'] // 1024} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {ram['normal-bytes'] // 1024} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] // 1024} kbytes",
            f"multifd bytes: {ram['multifd-bytes'] // 1024} kbytes",
            f"pages-per-second: {ram['pages-per-second']}",
        ]
    if ram.get("postcopy-bytes") or ram.get("postcopy-requests"):
        lines += [f"postcopy request count: {ram['postcopy-requests']}",
                  f"postcopy ram: {ram['postcopy-bytes'] // 1024} kbytes"]
    if lm.get("postcopy"):
        pc = lm["postcopy"]
        lat = pc.get("fault-latency-us") or {}
        lines.append(f"post-copy: {pc.get('time-ms')} ms, {pc.get('pages-requested')} pages requested, "
                     f"{pc.get('faults')} faults, fault latency p50 {lat.get('p50')} us p99 {lat.get('p99')} us, "
                     f"verified {'yes' if pc.get('verified') else 'no'}")
    if "cpu-throttle-percentage" in q:
        lines.append(f"cpu throttle percentage: {q['cpu-throttle-percentage']}")
    if "auto-converge" in lm:
        ac = lm["auto-converge"]
        lines.append(f"auto-converge: cpu throttle reached {ac['cpu-throttle-peak']} %, "
                     f"held each vCPU {ac['cpu-throttle-held-s']:.1f} s")
    lines += [
        f"method: {lm['method']}{level} "
        f"on {plural(lm['channels'], 'channel')}: {lm['backend']}",
        *([f"picked by multifd-compression auto: {lm['auto']['reason']}"] if lm.get("auto") else []),
        f"compression ratio: {lm['compression-ratio']:.2f}",
        f"send cpu: {lm['send-cpu-percent']:.0f} %   recv cpu: {lm['recv-cpu-percent']:.0f} %",
        f"memory used by migration: send {format_size(lm['send-mem-bytes'])}, "
        f"recv {format_size(lm['recv-mem-bytes'])}",
        f"guest: {lm['guest'].get('kind', '?')}, {format_size(lm['guest'].get('memory', 0))}, "
        f"workload {lm['guest'].get('workload', '?')}, fill {lm['guest'].get('fill', '?')}",
    ]
    return "\n".join(lines)
