"""The handover on a misbehaving link (issue 9, reports 1 and 4): at most one guest ever runs.

A :class:`~support.relay.Relay` sits between a real Source and Destination (TCP on 127.0.0.1,
portable counter guests) and drops, delays, silences or cuts one handover message. After the
outcome both guests' progress counters are sampled over 0.5 s: the one that advances is the one
that runs, and never both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from livemig.guest import Guest, GuestConfig, create_guest
from livemig.migration import protocol
from livemig.migration.destination import Destination
from livemig.migration.source import Source
from livemig.migration.stats import MigrationStats
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from support.migrate import cli
from support.relay import Relay, Tap

MEM = 4 << 20
PARAMS = MigrationParameters(multifd_channels=1, max_bandwidth=0)
CONFIG = GuestConfig(kind="portable", memory=MEM, workload="counter", fill="random", seed=3)


@dataclass
class Outcome:
    stats: MigrationStats
    dst: dict[str, Any]
    src_runs: bool
    dst_runs: bool


def _runs(guests: tuple[Guest, Guest]) -> tuple[bool, bool]:
    """Which guests advance their counter over 0.5 s."""
    before = [g.progress() for g in guests]
    time.sleep(0.5)
    after = [g.progress() for g in guests]
    return after[0] > before[0], after[1] > before[1]


def _migrate(up: Tap | None = None, down: Tap | None = None, timeout: float = 1.0,
             cancel_when: Callable[[Source], bool] | None = None, src_timeout: float | None = None,
             params: MigrationParameters = PARAMS, config: GuestConfig = CONFIG) -> Outcome:
    """One migration through a relay with taps ``up``/``down``; ``timeout`` is the destination's
    (and the source's, unless ``src_timeout``). ``cancel_when(source)`` cancels the source once true."""
    sg = create_guest(config)
    dg = create_guest(config, incoming=True)
    try:
        d = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=dg, timeout=timeout)
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(d.run()))
        t.start()
        sg.start()
        with Relay(("127.0.0.1", d.port), up=up, down=down) as relay:
            src = Source(sg, parse_address(relay.uri), params, timeout=src_timeout or timeout)
            if cancel_when is not None:
                def watch() -> None:
                    deadline = time.monotonic() + 30
                    while not cancel_when(src) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    src.cancel()
                threading.Thread(target=watch, daemon=True).start()
            stats = src.run()
            t.join(timeout=max(timeout, src_timeout or 0) * 4 + 10)
            assert not t.is_alive()
        src_runs, dst_runs = _runs((sg, dg))
        assert not (src_runs and dst_runs), "both copies of the guest run"
        assert sg.running == src_runs and stats.source_guest == ("running" if src_runs else "postmigrate")
        assert out["resumed"] == dst_runs
        if dst_runs:
            dg.check_workload()
        return Outcome(stats, out, src_runs, dst_runs)
    finally:
        sg.close()
        dg.close()


def _seen(tap: Tap, kind: bytes) -> Callable[[Source], bool]:
    return lambda _src: any(kind in line for line in tap.lines)


RESUMED, PREPARED, COMMIT, READY = b'"type":"resumed"', b'"type":"prepared"', b'"type":"commit"', b'"type":"ready"'
ABORT, FAILED = b'"type":"abort"', b'"type":"failed"'
#: what a destination that read the source's Abort says
ABORTED = "the source aborted the migration: migration cancelled"


def test_clean_handover_runs_the_destination_only() -> None:
    o = _migrate()
    assert o.stats.status == "completed" and o.stats.handover == protocol.S_COMPLETED
    assert o.dst_runs and not o.src_runs
    assert "destination resumed" in o.stats.downtime_phases


def test_swallowed_resumed_then_silence_leaves_the_source_paused_with_an_unknown_outcome() -> None:
    """Report 1: the relay passes everything but the destination's Resumed, then stays silent."""
    o = _migrate(down=Tap(drop=RESUMED, silence_after=RESUMED))
    assert o.stats.status == "failed" and o.stats.handover == protocol.S_UNKNOWN
    assert o.stats.error.startswith("outcome unknown") and "resume the source guest explicitly" in o.stats.error
    assert protocol.UNKNOWN_ADVICE in o.stats.notes
    assert o.dst_runs and not o.src_runs


@pytest.mark.parametrize(("down", "what"), [
    (Tap(silence_after=READY), "silent after Ready"),
    (Tap(drop=PREPARED), "Prepared dropped"),
    (Tap(delay=(PREPARED, 1.5)), "Prepared later than the timeout"),
    (Tap(cut_after=READY), "link cut after Ready"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_no_prepared_in_time_resumes_the_source_and_the_destination_discards(down: Tap, what: str) -> None:
    o = _migrate(down=down)
    assert o.stats.status == "failed" and o.stats.handover == protocol.S_FAILED, what
    assert o.src_runs and not o.dst_runs
    assert o.dst["status"] == "failed" and o.dst["guest"] == "none"


@pytest.mark.parametrize("up", [Tap(drop=COMMIT), Tap(delay=(COMMIT, 1.5))], ids=["dropped", "late"])
def test_lost_or_late_commit_runs_neither_guest(up: Tap) -> None:
    """The source got Prepared and committed; the destination never got the Commit (in time)."""
    o = _migrate(up=up)
    assert o.stats.handover == protocol.S_UNKNOWN and o.stats.source_guest == "postmigrate"
    assert not o.src_runs and not o.dst_runs
    assert o.dst["handover"] == protocol.D_DISCARDED


def test_link_cut_after_prepared_leaves_the_source_paused() -> None:
    """Prepared got through, then the link broke: the source committed, so it stays paused; whether
    its Commit beat the cut decides whether the destination runs (a race the rules allow)."""
    o = _migrate(down=Tap(cut_after=PREPARED))
    assert o.stats.handover == protocol.S_UNKNOWN and not o.src_runs


def test_commit_delivered_then_link_cut_runs_the_destination_only() -> None:
    o = _migrate(up=Tap(cut_after=COMMIT))
    assert o.stats.handover == protocol.S_UNKNOWN
    assert o.dst_runs and not o.src_runs


@pytest.mark.parametrize(("up", "down"), [(Tap(delay=(COMMIT, 0.3)), None), (None, Tap(delay=(RESUMED, 0.3)))],
                         ids=["commit", "resumed"])
def test_a_delay_within_the_timeout_completes(up: Tap | None, down: Tap | None) -> None:
    o = _migrate(up=up, down=down, timeout=2.0)
    assert o.stats.status == "completed" and o.dst_runs and not o.src_runs


def test_cancel_while_resumed_is_in_flight_is_too_late() -> None:
    down = Tap(delay=(RESUMED, 0.8))
    o = _migrate(down=down, timeout=2.0, cancel_when=_seen(down, RESUMED))
    assert o.stats.status == "completed", o.stats.error
    assert protocol.TOO_LATE in o.stats.notes
    assert o.dst_runs and not o.src_runs


def _cancelled_and_aborted(o: Outcome) -> None:
    """The source was cancelled and runs; the destination discarded its guest because of the Abort
    (its timeout, 30 s, was far away: without the Abort it would have said so)."""
    assert o.stats.status == "cancelled" and o.stats.handover == protocol.S_CANCELLED, o.stats.error
    assert o.src_runs and not o.dst_runs
    assert o.dst["handover"] == protocol.D_DISCARDED and ABORTED in o.dst["error-desc"], o.dst


@pytest.mark.parametrize("step", [READY, PREPARED], ids=["waiting-for-ready", "waiting-for-prepared"])
def test_a_cancel_while_the_source_waits_aborts_and_the_destination_discards_at_once(step: bytes) -> None:
    """The relay holds the destination's answer; the cancel comes while the source waits for it."""
    down = Tap(delay=(step, 0.8))
    _cancelled_and_aborted(_migrate(down=down, timeout=30.0, cancel_when=_seen(down, step)))


def test_a_cancel_during_the_ram_passes_aborts_between_two_records() -> None:
    """32 MiB at 8 MiB/s on 2 channels: the cancel lands in a pass, in the middle of a RAM section;
    the Abort goes where the stream's next record was due."""
    config = GuestConfig(kind="portable", memory=32 << 20, workload="counter", fill="random", seed=3)
    params = MigrationParameters(multifd_channels=2, max_bandwidth=8 << 20)

    def mid_ram(src: Source) -> bool:
        return src.stats.status == "active" and src.channels.wire_bytes() > 1 << 20

    o = _migrate(timeout=30.0, cancel_when=mid_ram, params=params, config=config)
    _cancelled_and_aborted(o)
    assert 0 < o.stats.multifd_bytes < 24 << 20 and o.stats.passes == 1


@pytest.mark.parametrize("up", [Tap(drop=ABORT), Tap(delay=(ABORT, 0.3))], ids=["dropped", "late"])
def test_a_lost_or_late_abort_still_discards(up: Tap) -> None:
    """The relay swallows or holds the Abort: the source waits up to 1 s for the destination to
    close, then closes its channels itself. A late Abort (0.3 s) is still what the destination
    discards for; a lost one leaves it the lost link."""
    down = Tap(delay=(PREPARED, 0.5))
    o = _migrate(up=up, down=down, timeout=30.0, cancel_when=_seen(down, PREPARED))
    assert o.stats.status == "cancelled" and o.src_runs and not o.dst_runs
    assert o.dst["handover"] == protocol.D_DISCARDED
    assert (ABORTED in o.dst["error-desc"]) == (up.drop is None), o.dst


@pytest.mark.parametrize(("up", "down", "handover", "told"), [
    (None, Tap(drop=PREPARED), protocol.S_FAILED, True),
    (Tap(drop=COMMIT), None, protocol.S_UNKNOWN, True),
    (Tap(drop=COMMIT), Tap(drop=FAILED), protocol.S_UNKNOWN, False),
], ids=["prepared-lost", "commit-lost", "commit-lost-and-failed-lost"])
def test_a_destination_that_gives_up_tells_the_source_why(up: Tap | None, down: Tap | None, handover: str,
                                                          told: bool) -> None:
    """The destination (timeout 1 s) waits for a Commit that does not come, gives up first (its
    own wait or its idle channel times out) and answers Failed with its reason; the source (timeout
    3 s) reports that reason, not its own "no answer" (unless the relay swallows the Failed too).
    Before the commit point its guest runs on; after it, it stays paused."""
    o = _migrate(up=up, down=down, timeout=1.0, src_timeout=3.0)
    assert o.stats.handover == handover and o.src_runs == (handover == protocol.S_FAILED) and not o.dst_runs
    assert ("destination failed: " in o.stats.error) == told, o.stats.error
    assert ("within 1 s" in o.stats.error or "timed out" in o.stats.error) == told, o.stats.error


@pytest.mark.parametrize(("line", "words"), [
    (b'{"status": "resumed"}\n', "handover protocol version: received None"),
    (protocol.encode(protocol.Resumed()), "while waiting for 'prepared': received 'resumed'"),
    (protocol.encode(protocol.Prepared({"pc.ram": "00"}, state="00")), "RAM block 'pc.ram' differs"),
], ids=["bare-resumed", "resumed-before-commit", "wrong-digests"])
def test_a_forged_answer_is_refused_and_the_source_runs_on(line: bytes, words: str) -> None:
    """Report 4: a bare ``{"status": "resumed"}`` (or any answer but a matching Prepared) is not believed."""
    sg = create_guest(CONFIG)
    dg = create_guest(CONFIG, incoming=True)
    try:
        d = Destination(parse_address("tcp:127.0.0.1:0"), PARAMS, guest=dg, timeout=1.0)

        def forged(digests: dict[str, str], state: str) -> None:
            assert d.handover.rp is not None
            d.handover.rp.sock.sendall(line)

        d.handover.prepared = forged  # type: ignore[method-assign]
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(d.run()))
        t.start()
        sg.start()
        stats = Source(sg, parse_address(f"tcp:127.0.0.1:{d.port}"), PARAMS, timeout=1.0).run()
        t.join(timeout=10)
        assert stats.status == "failed" and words in stats.error
        assert stats.handover == protocol.S_FAILED and sg.running
        assert out["resumed"] is False
        assert _runs((sg, dg)) == (True, False)
    finally:
        sg.close()
        dg.close()


def test_report_1_between_processes(tmp_path: Path) -> None:
    """Report 1 as filed: ``livemig incoming`` and ``livemig migrate`` with a relay that swallows the
    destination's Resumed and then stays silent. The destination runs; the source stays paused."""
    port_file, djson, sjson = tmp_path / "port", tmp_path / "d.json", tmp_path / "s.json"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--guest", "portable", "--memory", "2M", "--multifd-channels", "1",
                            "--timeout", "1", "--run-after", "0.5", "--json", str(djson)],
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert time.monotonic() < deadline and dst.poll() is None
            time.sleep(0.02)
        with Relay(("127.0.0.1", int(port_file.read_text())), down=Tap(drop=RESUMED, silence_after=RESUMED)) as relay:
            r = cli("migrate", relay.uri, "--guest", "portable", "--memory", "2M", "--multifd-channels", "1",
                    "--timeout", "1", "--workload", "counter", "--max-bandwidth", "0", "--quiet", "--json", str(sjson))
            assert dst.wait(timeout=30) == 0
    finally:
        if dst.poll() is None:
            dst.kill()
        dst.wait()
    assert r.returncode == 3 and "outcome unknown" in r.stderr and "error" not in r.stderr, r.stderr
    assert r.stderr.count("outcome unknown") == 1 and "discarded with this process" in r.stderr, r.stderr
    s, d = json.loads(sjson.read_text()), json.loads(djson.read_text())
    assert s["livemig"]["source-guest"] == "postmigrate" and s["livemig"]["handover"] == "unknown"
    assert d["resumed"] is True and d["progress_after"] > d["progress_at_resume"] > 0


@pytest.mark.parametrize(("local", "peer", "text"), [
    ("Broken pipe", "no progress on any channel for 2 s",
     "destination: no progress on any channel for 2 s (source: Broken pipe)"),
    ("destination failed: guest differs", "guest differs", "destination: guest differs"),
    ("timed out", "", "timed out"),
])
def test_the_destinations_reason_leads(local: str, peer: str, text: str) -> None:
    from livemig.migration.handover import failure_text

    assert failure_text(local, peer) == text
