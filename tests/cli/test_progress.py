"""The progress display: figures from MigrationStats, a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import io
import re
import time

from livemig.migration.stats import ChannelCounters, MigrationStats
from livemig.ui.progress import ProgressDisplay, RateWindow, Snapshot, format_count, format_eta

MIB = 1 << 20


def _stats(status: str = "active", passes: int = 1, remaining: int = 96 * MIB, pages: int = 8192,
           wire: int = 32 * MIB, dirty: int = 0) -> MigrationStats:
    s = MigrationStats(status=status, passes=passes, ram_total=128 * MIB, remaining=remaining,
                       dirty_pages_rate=dirty)
    s.channels = [ChannelCounters(normal=pages, wire_bytes=wire)]
    return s


def test_percent_and_eta_from_remaining_pages_and_the_net_rate() -> None:
    snap = Snapshot(status="active", passes=2, ram_total=128 * MIB, remaining=32 * MIB, rate=125e6,
                    pages_per_second=10_000, dirty_pages_rate=2_000, page_size=4096)
    assert snap.percent == 75.0
    assert snap.eta == (32 * MIB // 4096) / 8_000  # remaining pages / (sent - dirtied) per second
    assert snap.text() == "pass 2  1.00 Gbps  10.0k pages/s  dirty 2.0k/s  ETA 0:02"  # 1.02 s, rounded up


def test_no_percent_or_eta_before_the_first_pass_counted_what_remains() -> None:
    snap = RateWindow().snapshot(_stats(status="setup", passes=0, remaining=0, pages=0, wire=0), now=1.0)
    assert snap.percent is None and snap.eta is None  # not "remaining 0 B" during setup
    assert snap.line().startswith("setup      --% of 128.00 MiB  pass 0")


def test_no_eta_while_the_guest_dirties_faster_than_pages_are_sent() -> None:
    snap = Snapshot(status="active", passes=5, ram_total=128 * MIB, remaining=MIB, rate=1e6,
                    pages_per_second=1_000, dirty_pages_rate=5_000, page_size=4096)
    assert snap.eta is None and snap.text().endswith("ETA -  not converging")
    assert snap.not_converging() == ("not converging: dirty rate 5.0k pages/s >= send rate 1.0k pages/s; "
                                     "see --max-passes or --downtime-limit")


def test_rates_over_the_recent_window() -> None:
    w = RateWindow(seconds=2.0)
    w.snapshot(_stats(pages=1000, wire=10 * MIB), now=10.0)
    snap = w.snapshot(_stats(pages=3000, wire=30 * MIB), now=11.0)
    assert snap.pages_per_second == 2000 and snap.rate == 20 * MIB
    snap = w.snapshot(_stats(pages=3000, wire=30 * MIB), now=14.0)  # nothing moved for 3 s
    assert snap.pages_per_second == 0


def test_completed_shows_all_of_ram() -> None:
    snap = RateWindow().snapshot(_stats(status="completed", passes=3, remaining=4 * MIB), now=1.0)
    assert snap.percent == 100.0 and snap.eta == 0.0


def test_formats() -> None:
    assert [format_count(n) for n in (950, 31_600, 2_100_000)] == ["950", "31.6k", "2.10M"]
    assert [format_eta(s) for s in (None, 7, 62, 3723)] == ["-", "0:07", "1:02", "1:02:03"]
    assert format_eta(0.2) == "0:01"  # never 0:00 while something remains


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    stats = _stats()
    display = ProgressDisplay(lambda: stats, stream=out, tty=False, period=0.01)
    with display:
        display.log("livemig: a message")
        deadline = time.monotonic() + 30
        while out.getvalue().count("\n") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = out.getvalue().splitlines()
    assert lines[0] == "livemig: a message"
    assert all(line.startswith("active     25% of 128.00 MiB  pass 1") for line in lines[1:])
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_rich_bar_on_a_terminal_keeps_messages_off_the_bar() -> None:
    out = io.StringIO()
    stats = _stats()
    display = ProgressDisplay(lambda: stats, stream=out, tty=True, period=0.01)
    display.console.width = 100
    with display:
        display.log("livemig incoming: a message")
        stats.status, stats.remaining = "completed", 0
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    frames = [f for line in plain.split("\n") for f in line.split("\r") if f.strip()]
    assert "livemig incoming: a message" in frames  # a line of its own, not written onto the bar
    assert re.search(r"completed 100% \S* pass 1 ", frames[-1]), frames[-1]


def test_quiet_draws_nothing() -> None:
    out = io.StringIO()
    display = ProgressDisplay(_stats, stream=out, tty=True, enabled=False, period=0.01)
    with display:
        display.log("hidden")
    assert out.getvalue() == ""


def test_the_first_pass_counts_pages_sent_not_pages_queued() -> None:
    # everything queued to the channels (remaining 0), but only 2048 of 32768 pages written
    snap = RateWindow().snapshot(_stats(remaining=0, pages=2048), now=1.0)
    assert snap.remaining == 128 * MIB - 2048 * 4096 and snap.percent_text() == "6%"
    assert snap.eta is not None and snap.eta > 0
    # cancelled or failed in the first pass: the same count of what the destination holds
    snap = RateWindow().snapshot(_stats(status="cancelled", remaining=0, pages=2048), now=1.0)
    assert snap.percent_text() == "6%"


def test_a_later_pass_with_everything_queued_is_not_shown_as_done() -> None:
    snap = RateWindow().snapshot(_stats(passes=4, remaining=0, pages=40_000, dirty=100), now=1.0)
    assert snap.percent_text() == "99%" and snap.eta is None and "ETA -" in snap.text()
    done = RateWindow().snapshot(_stats(status="completed", passes=4, remaining=0, pages=40_000), now=1.0)
    assert done.percent_text() == "100%" and done.eta == 0.0


def test_not_converging_is_said_once() -> None:
    out = io.StringIO()
    stats = _stats(passes=5, remaining=8 * MIB, dirty=50_000)
    display = ProgressDisplay(lambda: stats, stream=out, tty=False, period=0.01)
    with display:
        deadline = time.monotonic() + 30
        while out.getvalue().count("\n") < 6 and time.monotonic() < deadline:
            stats.passes += 1
            time.sleep(0.01)
    lines = out.getvalue().splitlines()
    told = [line for line in lines if line.startswith("livemig: not converging: dirty rate 50.0k pages/s >= send")]
    assert len(told) == 1 and told[0].endswith("see --max-passes or --downtime-limit"), lines
    after = lines[lines.index(told[0]) + 1:]
    assert after and all(line.endswith("ETA -  not converging") for line in after), lines


def test_a_cancel_keeps_the_percent_transferred_and_shows_no_eta() -> None:
    window = RateWindow()
    running = window.snapshot(_stats(passes=3, remaining=28 * MIB, pages=40_000), now=1.0)
    assert running.percent_text() == "78%"
    # everything queued when the cancel came: what was queued did not reach the destination
    for status in ("cancelled", "failed"):
        end = window.snapshot(_stats(status=status, passes=3, remaining=0, pages=40_000), now=2.0)
        assert end.percent_text() == "78%" and end.eta is None, status
        assert "ETA" not in end.text() and "ETA" not in end.line(), end.line()


def test_no_eta_once_not_converging_until_a_later_pass_is_slower_than_sending() -> None:
    window = RateWindow(seconds=0.5)
    t = 0.0
    pages = 0

    def step(passes: int, dirty: int, sent: int) -> Snapshot:
        nonlocal t, pages
        t, pages = t + 1.0, pages + sent
        return window.snapshot(_stats(passes=passes, remaining=8 * MIB, pages=pages, dirty=dirty), now=t)

    step(3, 50_000, 1000)
    assert not step(3, 50_000, 1000).converging
    # the send rate briefly above the dirty rate in the same pass: still not converging, no ETA
    snap = step(3, 500, 10_000)
    assert snap.eta is None and snap.text().endswith("ETA -  not converging"), snap.text()
    # a later pass where the guest dirties slower than pages are sent: converging, ETA again
    snap = step(4, 500, 10_000)
    assert snap.converging and snap.eta is not None and "not conv" not in snap.text()


def test_status_and_percent_stay_visible_at_80_columns() -> None:
    out = io.StringIO()
    stats = _stats(passes=12, remaining=8 * MIB, dirty=2_100_000, wire=32 << 30)
    display = ProgressDisplay(lambda: stats, stream=out, tty=True, period=0.01)
    display.console.width = 80
    with display:
        deadline = time.monotonic() + 30
        while "no conv." not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    frames = [f for line in plain.split("\n") for f in line.split("\r") if f.strip()]
    bars = [f for f in frames if "no conv." in f]
    assert bars and all(len(f.rstrip()) <= 80 for f in bars), frames
    assert all(re.match(r"active\s+93%", f) and "ETA -" in f for f in bars), bars


def test_postcopy_active_shows_the_pages_requested_and_is_running() -> None:
    s = _stats(status="postcopy-active", passes=1, remaining=16 * MIB)
    s.postcopy_requests = 1234
    snap = RateWindow().snapshot(s, now=1.0)
    assert not snap.ended and snap.percent == 87.5
    assert "requested 1.2k" in snap.text() and snap.line().startswith("postcopy-active  87% of 128.00 MiB")
    assert "requests 1234" in s.progress_line()
