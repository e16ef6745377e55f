"""What a benchmark run produced, and how runs become table rows. Pure: no processes, no clocks.

A :class:`Run` is one migration (livemig or QEMU) with its result dictionary (the ``livemig migrate
--json`` shape, or the equivalent built from QEMU's ``query-migrate``) or the error that stopped it.
:func:`aggregate` groups runs by (peer, method, channels, bandwidth) into :class:`Row` objects whose
statistics are the median, minimum and maximum over the successful repeats. Every number in a row
comes from a run's result: nothing here has a default figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import MigrationError
from ..wire.constants import PAGE_SIZE

#: peers a row can come from
PEERS = ("livemig", "qemu")
#: what a row run over TLS (``bench --tls``) adds to its method's label: ``zstd+tls``
TLS_SUFFIX = "+tls"
#: what a row's convergence (``bench --auto-converge``, ``--postcopy-ram``) adds to its method's
#: label, before any TLS suffix: ``zstd+auto-converge``, ``zstd+postcopy+tls``
CONVERGENCE_SUFFIX = {"precopy": "", "auto-converge": "+auto-converge", "postcopy": "+postcopy"}


def row_label(method: str, convergence: str = "precopy", tls: bool = False) -> str:
    """A livemig row's label: the method, its convergence suffix, then the TLS one."""
    return method + CONVERGENCE_SUFFIX[convergence] + (TLS_SUFFIX if tls else "")


def label_parts(label: str) -> tuple[str, str]:
    """(method, convergence) of a row label (its TLS suffix dropped): the inverse of :func:`row_label`."""
    method = label.removesuffix(TLS_SUFFIX)
    for conv, suffix in CONVERGENCE_SUFFIX.items():
        if suffix and method.endswith(suffix):
            return method.removesuffix(suffix), conv
    return method, "precopy"


class BenchError(MigrationError):
    """A benchmark that cannot be set up (bad option, missing program), naming what was wrong."""


def _num(result: dict[str, Any], *path: str) -> float | None:
    cur: Any = result
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    if isinstance(cur, bool) or not isinstance(cur, int | float):
        return None
    return float(cur)


#: metric name -> how to read it from a result dictionary (None when the result lacks it)
METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "total-time": lambda r: _num(r, "total-time"),
    "downtime": lambda r: _num(r, "downtime"),
    "setup-time": lambda r: _num(r, "setup-time"),
    "mbps": lambda r: _num(r, "ram", "mbps"),
    "pages-per-second": lambda r: _num(r, "ram", "pages-per-second"),
    "send-cpu": lambda r: _num(r, "livemig", "send-cpu-percent"),
    "recv-cpu": lambda r: _num(r, "livemig", "recv-cpu-percent"),
    "wire-bytes": lambda r: _num(r, "livemig", "wire-bytes"),
    "socket-bytes": lambda r: _num(r, "bench", "socket-bytes"),
    "send-mem": lambda r: _num(r, "livemig", "send-mem-bytes"),
    "recv-mem": lambda r: _num(r, "livemig", "recv-mem-bytes"),
    "transferred": lambda r: _num(r, "ram", "transferred"),
    "normal": lambda r: _num(r, "ram", "normal"),
    "duplicate": lambda r: _num(r, "ram", "duplicate"),
    "ram-total": lambda r: _num(r, "ram", "total"),
    "compression-ratio": lambda r: _num(r, "livemig", "compression-ratio"),
    "dirty-sync-count": lambda r: _num(r, "ram", "dirty-sync-count"),
    "pages-sent-per-ram-page": lambda r: _sent_per_page(r),
    # how a busy guest's migration finished (auto-converge, post-copy: livemig's query-migrate figures)
    "cpu-throttle-peak": lambda r: _num(r, "livemig", "auto-converge", "cpu-throttle-peak"),
    "postcopy-time": lambda r: _num(r, "livemig", "postcopy", "time-ms"),
    "postcopy-requests": lambda r: _num(r, "livemig", "postcopy", "pages-requested"),
    "fault-p50": lambda r: _num(r, "livemig", "postcopy", "fault-latency-us", "p50"),
    "fault-p99": lambda r: _num(r, "livemig", "postcopy", "fault-latency-us", "p99"),
}


def _sent_per_page(r: dict[str, Any]) -> float | None:
    """(normal + zero pages sent) / RAM pages: 1.0 when every page went once, more when re-sent."""
    normal, dup = _num(r, "ram", "normal"), _num(r, "ram", "duplicate")
    total, page = _num(r, "ram", "total"), _num(r, "ram", "page-size") or float(PAGE_SIZE)
    if normal is None or dup is None or not total:
        return None
    return (normal + dup) * page / total


def not_finished(timeout: float, info: dict[str, Any] | None) -> str:
    """A run stopped at the bench's ``--timeout``: "did not converge in T s" while precopy still ran
    (with its passes and the guest's dirty rate), else "timed out after T s" and the status it was in."""
    info = info or {}
    ram = info.get("ram", {})
    if info.get("status") in ("active", "cancelled", "cancelling") and ram.get("dirty-sync-count"):
        rate = f", guest dirtying {ram['dirty-pages-rate']} pages/s" if ram.get("dirty-pages-rate") else ""
        return f"did not converge in {timeout:.0f} s ({ram['dirty-sync-count']} passes{rate})"
    status = f" (status {info['status']})" if info.get("status") else ""
    return f"timed out after {timeout:.0f} s{status}"


@dataclass(frozen=True)
class Stat:
    """Median, minimum and maximum of one metric over ``n`` successful runs."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("Stat.of needs at least one value")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))


@dataclass
class Run:
    """One migration of one method: its result, or why there is none.

    ``na`` is set when the run was not attempted because something it needs is missing here (the
    row then says "n/a: <na>"); ``error`` when it was attempted and failed.
    """

    peer: str
    method: str
    channels: int
    bandwidth: int  # bytes/s, 0 = uncapped
    repeat: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    na: str | None = None
    #: what the bench itself measured around the run (socket bytes, wall time, command line)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result is not None and self.error is None and self.na is None

    def metric(self, name: str) -> float | None:
        if self.result is None:
            return None
        merged = dict(self.result)
        if self.extra:
            merged["bench"] = self.extra
        return METRICS[name](merged)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Row:
    """One line of a table: a (peer, method, channels, bandwidth) group of runs."""

    peer: str
    method: str
    channels: int
    bandwidth: int
    runs: list[Run]
    stats: dict[str, Stat]
    #: "n/a: ..." or the first error, when no run succeeded (else None)
    note: str | None
    #: errors of failed repeats (when other repeats succeeded)
    errors: list[str]
    backend: str | None
    accelerated: bool | None
    #: the 2-core compute limit for this row in ms, when known (filled by the caller)
    limit_ms: float | None = None
    limit_note: str | None = None
    #: an ``auto`` row: what its runs picked (``zstd-1``; several joined by ``/``)
    picked: str | None = None

    def value(self, name: str) -> float | None:
        s = self.stats.get(name)
        return s.median if s else None

    @property
    def of_limit(self) -> float | None:
        """Percent of the compute limit reached: 100 x limit / median total time."""
        total = self.value("total-time")
        if self.limit_ms is None or not total:
            return None
        return 100.0 * self.limit_ms / total

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "method": self.method,
            "channels": self.channels,
            "bandwidth": self.bandwidth,
            "note": self.note,
            "errors": self.errors,
            "backend": self.backend,
            "accelerated": self.accelerated,
            "limit-ms": self.limit_ms,
            "limit-note": self.limit_note,
            "percent-of-limit": self.of_limit,
            "picked": self.picked,
            "stats": {k: asdict(v) for k, v in self.stats.items()},
            "runs": len(self.runs),
        }


def _key(run: Run) -> tuple[str, str, int, int]:
    return (run.peer, run.method, run.channels, run.bandwidth)


def aggregate(runs: Iterable[Run]) -> list[Row]:
    """Group ``runs`` into rows (first-seen order) with median/min/max of every metric.

    A metric appears in a row's stats only if at least one successful run reported it. A row
    with no successful run carries ``note`` ("n/a: reason" or "error: ...") and no stats.
    """
    groups: dict[tuple[str, str, int, int], list[Run]] = {}
    for run in runs:
        groups.setdefault(_key(run), []).append(run)
    rows: list[Row] = []
    for (peer, method, channels, bandwidth), group in groups.items():
        good = [r for r in group if r.ok]
        stats: dict[str, Stat] = {}
        for name in METRICS:
            values = [v for v in (r.metric(name) for r in good) if v is not None]
            if values:
                stats[name] = Stat.of(values)
        errors = [f"run {r.repeat + 1}: {r.error}" for r in group if r.error]
        note: str | None = None
        if not good:
            na = next((r.na for r in group if r.na), None)
            note = f"n/a: {na}" if na else "error: " + (group[0].error or "no result")
        backend: str | None = None
        accelerated: bool | None = None
        for r in good:
            lm = (r.result or {}).get("livemig", {})
            if isinstance(lm, dict):
                if backend is None and isinstance(lm.get("backend"), str):
                    backend = lm["backend"]
                if accelerated is None and isinstance(lm.get("accelerated"), bool):
                    accelerated = lm["accelerated"]
        rows.append(Row(peer, method, channels, bandwidth, group, stats, note, errors, backend, accelerated))
    return rows


def ratio_row(ours: Row, theirs: Row, metrics: Sequence[str]) -> dict[str, float | None]:
    """metric -> ours / theirs of the medians (None where either is missing or theirs is 0)."""
    out: dict[str, float | None] = {}
    for name in metrics:
        a, b = ours.value(name), theirs.value(name)
        out[name] = a / b if a is not None and b else None
    return out
