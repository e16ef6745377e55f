"""Live progress of a migration, drawn from its :class:`~livemig.migration.stats.MigrationStats`.

On a terminal it is a rich progress bar on stderr (status, bar, percent of RAM in sync, pass, rate,
pages/s, dirty rate, ETA), redrawn in place; anything else the command prints while it runs goes
through :meth:`ProgressDisplay.log`, above the bar, never into it. When stderr is not a terminal
(a log file, a pipe) the same figures are printed as one plain line every few seconds.

Figures: *percent* = (RAM - remaining) / RAM, the share of guest RAM the destination holds (it
drops when a pass finds pages dirtied again). ``stats.remaining`` counts pages not yet *queued* to
the channels, which may hold several MiB each; so in the first pass, remaining is taken from the
pages the channels sent (normal + zero: what the destination holds), the larger of the two. A
channel counts a packet's pages when it builds the packet, just before writing it, so while the
migration runs a remaining of 0 means "the last packets are being written" (and, in later passes,
"every page of the pass is queued, some still in flight"): the percent then stops at 99 % and the
ETA shows "-" until the migration completes. *rate* and
*pages/s* are over the last ~2 s (wire bytes, after compression; pages sent, normal + zero);
*dirty* is ``dirty-pages-rate``; *ETA* = remaining pages / (pages/s - dirty pages/s), rounded up
(never 0:00 while pages remain), "-" while RAM is dirtied as fast as it is sent or before the first
pass has counted what remains. After :data:`CONVERGENCE_PASSES` passes with the guest dirtying pages
at least as fast as they are sent, the migration is said not to converge, once, with what to change;
the ETA then shows "-" until a later pass finds the guest dirtying slower than pages are sent. A
cancelled or failed migration keeps the percent last shown while it ran, and has no ETA.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from ..migration.stats import MigrationStats
from ..units import format_rate_bits, format_size

#: statuses during which the migration moves RAM (QEMU's names)
RUNNING = ("setup", "active", "device", "postcopy-active")
#: passes after which a dirty rate at or above the send rate is reported as not converging
CONVERGENCE_PASSES = 3


def format_count(n: float) -> str:
    """``950``, ``31.6k``, ``2.10M``: a rate of pages, short."""
    if n < 1000:
        return f"{n:.0f}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1e6:.2f}M"


def format_eta(seconds: float | None) -> str:
    """``0:07``, ``1:02:03``, or ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = math.ceil(seconds)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass(frozen=True)
class Snapshot:
    """What one progress update shows (bytes, bytes/s, pages/s, seconds)."""

    status: str
    passes: int
    ram_total: int
    remaining: int | None  # None before the first pass has counted it
    rate: float
    pages_per_second: float
    dirty_pages_rate: int
    page_size: int
    #: False when every page of the pass is queued but some may still be in flight (remaining 0 then
    #: means "unknown, small", not "done")
    settled: bool = True
    #: the migration was found not converging and no later pass has shown the guest slower than the send
    #: rate yet (:class:`RateWindow` decides it across snapshots)
    stalled: bool = False
    #: a cancelled or failed migration: at most the percent last shown while it ran (pages queued or in
    #: flight when it ended did not reach the destination)
    cap: float | None = None
    #: auto-converge's vCPU throttle, percent (0 = off: not shown)
    throttle: int = 0
    #: post-copy: pages the destination asked for (shown while ``postcopy-active``)
    postcopy_requests: int = 0

    @property
    def ended(self) -> bool:
        """Ended without completing (cancelled, failed): the figures are final, there is no ETA."""
        return self.status not in RUNNING and self.status not in ("completed", "none")

    @property
    def dirtying_faster(self) -> bool:
        """After :data:`CONVERGENCE_PASSES` passes, the guest dirties pages at least as fast as they are
        sent (dirty-pages-rate >= pages/s)."""
        return (self.status == "active" and self.passes >= CONVERGENCE_PASSES
                and self.dirty_pages_rate > 0 and self.dirty_pages_rate >= self.pages_per_second)

    @property
    def converging(self) -> bool:
        """False while :attr:`dirtying_faster` or :attr:`stalled`."""
        return not (self.dirtying_faster or (self.stalled and self.status == "active"))

    @property
    def percent(self) -> float | None:
        if self.remaining is None or not self.ram_total:
            return None
        share = 100.0 * (self.ram_total - self.remaining) / self.ram_total
        share = share if self.settled else min(share, 99.0)
        return share if self.cap is None else min(share, self.cap)

    @property
    def eta(self) -> float | None:
        if self.remaining is None or not self.settled or self.ended or not self.converging:
            return None
        if self.remaining == 0:
            return 0.0
        net = self.pages_per_second - self.dirty_pages_rate
        return self.remaining / self.page_size / net if net > 0 else None

    def percent_text(self) -> str:
        """``42%``, or ``--%`` before the first pass counted what remains."""
        return "--%" if self.percent is None else f"{math.floor(self.percent):.0f}%"

    def text(self, width: int | None = None) -> str:
        """The figures after the bar: ``pass 1  1.00 Gbps  31.6k pages/s  dirty 0/s  ETA 0:07`` (with
        ``throttle 30%`` after the dirty rate while auto-converge throttles the vCPUs), then
        ``not converging`` when it does not; no ETA once ended (cancelled, failed).

        ``width``: at most this many characters; the pages/s, then the rate, then the pass are dropped
        first and the suffix shortened to ``no conv.``, so the ETA and the suffix stay.
        """
        eta = [] if self.ended else [f"ETA {format_eta(self.eta)}"]
        parts = {"pass": f"pass {self.passes}", "rate": format_rate_bits(self.rate),
                 "pps": f"{format_count(self.pages_per_second)} pages/s",
                 "dirty": f"dirty {format_count(self.dirty_pages_rate)}/s"}
        if self.throttle:
            parts["throttle"] = f"throttle {self.throttle}%"
        if self.status == "postcopy-active":
            parts["postcopy"] = f"requested {format_count(self.postcopy_requests)}"
        suffix = [] if self.converging else ["not converging"]
        text = "  ".join([*parts.values(), *eta, *suffix])
        if suffix and width is not None and len(text) > width:
            suffix = ["no conv."]
        for drop in ("pps", "rate", "pass"):
            text = "  ".join([*parts.values(), *eta, *suffix])
            if width is None or len(text) <= width:
                break
            del parts[drop]
        return "  ".join([*parts.values(), *eta, *suffix])

    def not_converging(self) -> str:
        """The one line that says why the migration does not converge and what to change."""
        return (f"not converging: dirty rate {format_count(self.dirty_pages_rate)} pages/s >= send rate "
                f"{format_count(self.pages_per_second)} pages/s; see --max-passes or --downtime-limit")

    def line(self) -> str:
        """One plain line, for a log: status, percent of RAM (of its size), then :meth:`text`."""
        return f"{self.status:<9} {self.percent_text():>4} of {format_size(self.ram_total)}  {self.text()}"


class RateWindow:
    """Rates of wire bytes and pages over the last ``seconds`` of samples."""

    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, int, int]] = deque()
        #: the pass in which the migration was found not converging (None: converging)
        self._stalled_pass: int | None = None
        #: the percent of the last snapshot while the migration ran
        self._last_percent: float | None = None

    def snapshot(self, stats: MigrationStats, now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        pages = stats.normal + stats.duplicate
        self.samples.append((now, stats.transferred, pages))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.seconds:
            self.samples.popleft()
        t0, b0, p0 = self.samples[0]
        if now - t0 > 0.05 and stats.status in RUNNING:
            rate, pps = (stats.transferred - b0) / (now - t0), (pages - p0) / (now - t0)
        else:  # one sample so far, or the end: the whole-migration averages
            rate, pps = stats.mbps() * 1e6 / 8, stats.pages_per_second()
        counted = stats.passes > 0 or stats.status not in ("none", "setup")
        remaining: int | None = stats.remaining if counted else None
        if stats.status == "completed":
            remaining = 0
        elif remaining is not None and stats.passes <= 1 and not stats.status.startswith("postcopy"):
            # queued is not sent: what the channels sent (post-copy counts its own pages left)
            remaining = max(remaining, stats.ram_total - pages * stats.page_size, 0)
        snap = Snapshot(
            status=stats.status,
            passes=stats.passes,
            ram_total=stats.ram_total,
            remaining=remaining,
            rate=rate,
            pages_per_second=pps,
            dirty_pages_rate=stats.dirty_pages_rate,
            page_size=stats.page_size,
            throttle=stats.cpu_throttle_percentage,
            postcopy_requests=stats.postcopy_requests,
            settled=not (remaining == 0 and stats.status in RUNNING),
        )
        if snap.dirtying_faster and self._stalled_pass is None:
            self._stalled_pass = snap.passes
        elif self._stalled_pass is not None and snap.passes > self._stalled_pass and snap.status == "active" \
                and not snap.dirtying_faster and snap.dirty_pages_rate < snap.pages_per_second:
            self._stalled_pass = None  # a later pass with the guest slower than the send rate: ETA again
        snap = replace(snap, stalled=self._stalled_pass is not None,
                       cap=self._last_percent if snap.ended else None)
        if snap.status in RUNNING and snap.percent is not None:
            self._last_percent = snap.percent
        return snap


class ProgressDisplay:
    """Draws ``poll()``'s statistics every ``period`` seconds from a thread, between ``start`` and ``stop``.

    ``enabled=False`` (``--quiet``) draws nothing and drops :meth:`log` lines. ``tty`` defaults to
    whether ``stream`` is a terminal: a rich bar when true, plain lines when false.
    """

    def __init__(self, poll: Callable[[], MigrationStats], *, stream: TextIO | None = None, enabled: bool = True,
                 tty: bool | None = None, period: float | None = None) -> None:
        self.poll = poll
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.period = period if period is not None else (0.25 if self.tty else 2.0)
        self.console = Console(file=self.stream, force_terminal=self.tty or None, highlight=False)
        self.window = RateWindow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._lock = threading.Lock()
        #: the not-converging line was printed (once per migration)
        self._told = False

    # --- lines above the bar -----------------------------------------------------------------------
    def log(self, text: str) -> None:
        """Print one message line (above the bar on a terminal); nothing when disabled."""
        if not self.enabled:
            return
        with self._lock:
            if self._progress is not None:
                self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                print(text, file=self.stream, flush=True)

    # --- the bar -----------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._progress = Progress(
                TextColumn("{task.description:<9}"),
                TextColumn("{task.fields[percent]:>4}"),
                BarColumn(bar_width=self._bar_width()),
                TextColumn("{task.fields[figures]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._task = self._progress.add_task("setup", total=None, percent="", figures="")
            self._progress.start()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Draw the final figures once and leave them on screen."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._progress is not None:
            self._draw(self.window.snapshot(self.poll()))
            with self._lock:
                self._progress.stop()
                self._progress = None

    def __enter__(self) -> ProgressDisplay:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            snap = self.window.snapshot(self.poll())
            if snap.status in RUNNING:
                if not snap.converging and not self._told:
                    self._told = True
                    self.log(f"livemig: {snap.not_converging()}")
                self._draw(snap)

    def _draw(self, snap: Snapshot) -> None:
        if self._progress is None or self._task is None:
            self.log(snap.line())
            return
        done = None if snap.remaining is None else snap.ram_total - snap.remaining
        self._progress.update(self._task, description=snap.status, completed=done or 0,
                              total=None if done is None else snap.ram_total, percent=snap.percent_text(),
                              figures=snap.text(self.console.width - 9 - 4 - self._bar_width() - 4))

    def _bar_width(self) -> int:
        """10 to 40 characters: what the terminal leaves after about 72 of status, percent and figures."""
        return max(10, min(40, self.console.width - 72))
