"""A SIGKILL of either side at each handover step (issue 9): at most one copy of the guest ever runs.

A real ``livemig incoming`` (or ``livemig migrate``) process is killed at one step of the handover
of :mod:`livemig.migration.protocol`, the step pinned by a :class:`~support.relay.Relay` between
the two sides: its taps see each handover line, hold one back (so the side under test cannot move
on) or drop one (so the survivor cannot learn what the dead side did).

* Destination killed: the source is a :class:`~livemig.migration.source.Source` in this process,
  so its guest's counter can be sampled afterwards. Before the commit point its guest runs on;
  after it (Commit sent) it stays stopped in ``postmigrate`` with an unknown outcome (rules 3, 4).
* Source killed: its guest dies with it, so the destination's result JSON says what happened.
  Before the Commit it discards its guest (``resumed: false``, rule 2); after the Commit it runs it
  (``resumed: true``, its counter advancing), whatever became of the source.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.migration import protocol
from livemig.migration.source import Source
from livemig.migration.stats import MigrationStats
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from support.relay import Relay, Tap

pytestmark = pytest.mark.slow

MEM = 4 << 20
TIMEOUT = 2.0
CONFIG = GuestConfig(kind="portable", memory=MEM, workload="counter", fill="random", seed=3)
READY, PREPARED, COMMIT, RESUMED = b'"type":"ready"', b'"type":"prepared"', b'"type":"commit"', b'"type":"resumed"'
#: how long a held line waits in the relay: far longer than the kill takes, shorter than TIMEOUT
HOLD = 1.0


def _incoming(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """A ``livemig incoming`` process for a 4 MiB portable guest; returns it and its port."""
    port_file = tmp_path / "port"
    with (tmp_path / "incoming.err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                                 str(port_file), "--guest", "portable", "--memory", "4M", "--multifd-channels", "1",
                                 "--timeout", str(TIMEOUT), *extra], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        assert proc.poll() is None, (tmp_path / "incoming.err").read_text()
        assert time.monotonic() < deadline, "livemig incoming did not listen within 30 s"
        time.sleep(0.02)
    return proc, int(port_file.read_text())


class Killer:
    """SIGKILLs ``proc`` (by its pid, nothing else) as soon as ``when()`` holds; ``fired`` says it did."""

    def __init__(self, proc: subprocess.Popen[bytes], when: Callable[[], bool], limit: float = 20.0) -> None:
        self.proc = proc
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(when, limit), daemon=True)
        self._thread.start()

    def _watch(self, when: Callable[[], bool], limit: float) -> None:
        deadline = time.monotonic() + limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            if when():
                self.proc.send_signal(signal.SIGKILL)
                self.fired = True
                return
            time.sleep(0.002)

    def join(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _seen(tap: Tap, kind: bytes) -> Callable[[], bool]:
    return lambda: any(kind in line for line in tap.lines)


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """The exit status of ``proc``; kills it first if it outlived its test."""
    if proc.poll() is None:
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("a livemig process outlived its test by 15 s") from None
    return proc.returncode


# --- the destination killed ----------------------------------------------------------------------
@dataclass
class SourceSide:
    stats: MigrationStats
    up: Tap
    down: Tap
    runs: bool


def _kill_destination(tmp_path: Path, when: Callable[[Source, Tap, Tap], bool], up: Tap | None = None,
                      down: Tap | None = None, max_bandwidth: int = 0) -> SourceSide:
    """Migrate a counter guest from a Source here to a ``livemig incoming`` that is SIGKILLed when
    ``when(source, up, down)`` holds; returns the source's statistics and whether its guest runs."""
    up, down = up or Tap(), down or Tap()
    dst, port = _incoming(tmp_path, "--run-after", "5")  # alive after a resume: the kill lands there too
    guest = create_guest(CONFIG)
    try:
        guest.start()
        with Relay(("127.0.0.1", port), up=up, down=down) as relay:
            src = Source(guest, parse_address(relay.uri),
                         MigrationParameters(multifd_channels=1, max_bandwidth=max_bandwidth), timeout=TIMEOUT)
            killer = Killer(dst, lambda: when(src, up, down))
            t0 = time.monotonic()
            stats = src.run()
            took = time.monotonic() - t0
            killer.join()
        assert killer.fired, f"the destination was never killed: up {up.lines}, down {down.lines}, {stats.error}"
        assert _reap(dst) == -signal.SIGKILL  # it died of the kill, so it runs nothing
        assert stats.status == "failed" and stats.error
        assert took < TIMEOUT * 3 + HOLD, f"the source took {took:.1f} s to give up"
        before = guest.progress()
        time.sleep(0.5)
        runs = guest.progress() > before
        assert guest.running == runs
        assert stats.source_guest == ("running" if runs else "postmigrate")
        if runs:
            guest.check_workload()
        return SourceSide(stats, up, down, runs)
    finally:
        guest.close()
        if dst.poll() is None:
            dst.kill()
            dst.wait()


def _before_commit(s: SourceSide) -> None:
    """No Commit was sent: the source failed before the commit point and its guest runs on."""
    assert not any(COMMIT in line for line in s.up.lines)
    assert s.stats.handover == protocol.S_FAILED and s.stats.source_guest == "running" and s.runs


def _after_commit(s: SourceSide) -> None:
    """The Commit was sent: the outcome is unknown to the source, its guest stays stopped (postmigrate)."""
    assert any(COMMIT in line for line in s.up.lines)
    assert s.stats.handover == protocol.S_UNKNOWN and s.stats.source_guest == "postmigrate" and not s.runs
    assert s.stats.error.startswith("outcome unknown") and protocol.UNKNOWN_ADVICE in s.stats.notes


def test_destination_killed_right_after_ready(tmp_path: Path) -> None:
    """Ready is held in the relay while the destination dies: the source then finds nobody there."""
    s = _kill_destination(tmp_path, lambda _s, _u, down: _seen(down, READY)(), down=Tap(delay=(READY, HOLD)))
    assert len(s.down.lines) == 1  # Ready, and nothing after it
    _before_commit(s)


def test_destination_killed_mid_ram(tmp_path: Path) -> None:
    """At 2 MiB/s the 4 MiB of RAM take 2 s; the destination dies once a quarter of it was sent."""
    s = _kill_destination(tmp_path, lambda src, _u, _d: src.stats.transferred > MEM // 4, max_bandwidth=2 << 20)
    assert not any(PREPARED in line for line in s.down.lines)
    _before_commit(s)


def test_destination_killed_after_prepared_that_never_arrives(tmp_path: Path) -> None:
    """The destination sent Prepared and died; the Prepared is lost, so the source never commits."""
    s = _kill_destination(tmp_path, lambda _s, _u, down: _seen(down, PREPARED)(), down=Tap(drop=PREPARED))
    assert s.down.dropped and PREPARED in s.down.dropped[0]
    _before_commit(s)


def test_destination_killed_after_prepared_before_the_commit_reaches_it(tmp_path: Path) -> None:
    """Prepared got through and the source committed; its Commit is held in the relay while the
    destination dies. Neither guest runs: the source cannot know, so it waits for the operator."""
    s = _kill_destination(tmp_path, lambda _s, up, _d: _seen(up, COMMIT)(), up=Tap(delay=(COMMIT, HOLD)))
    _after_commit(s)


def test_destination_killed_after_the_commit_reached_it(tmp_path: Path) -> None:
    """The destination got the Commit (its Resumed proves it; the relay swallows that) and dies: the
    source, committed and without an answer, keeps its guest stopped."""
    s = _kill_destination(tmp_path, lambda _s, _u, down: _seen(down, RESUMED)(), down=Tap(drop=RESUMED))
    assert s.down.dropped and RESUMED in s.down.dropped[0]
    _after_commit(s)


def test_destination_killed_while_the_commit_is_in_flight(tmp_path: Path) -> None:
    """Killed the moment the relay sees the Commit: whether it got there first is a race, and either
    way the source stays stopped (no Resumed can reach it)."""
    s = _kill_destination(tmp_path, lambda _s, up, _d: _seen(up, COMMIT)(), down=Tap(drop=RESUMED))
    _after_commit(s)


# --- the source killed ---------------------------------------------------------------------------
def _kill_source(tmp_path: Path, when: Callable[[Tap, Tap], bool], up: Tap | None = None,
                 down: Tap | None = None) -> tuple[dict[str, Any], int, Tap, Tap]:
    """``livemig migrate`` of a counter guest to ``livemig incoming --run-after 0.5 --json``, the
    migrate process SIGKILLed when ``when(up, down)`` holds. Returns the destination's result JSON,
    its exit status and the taps."""
    up, down = up or Tap(), down or Tap()
    djson = tmp_path / "d.json"
    dst, port = _incoming(tmp_path, "--run-after", "0.5", "--json", str(djson))
    src: subprocess.Popen[bytes] | None = None
    try:
        with Relay(("127.0.0.1", port), up=up, down=down) as relay:
            src = subprocess.Popen([sys.executable, "-m", "livemig.cli", "migrate", relay.uri, "--guest", "portable",
                                    "--memory", "4M", "--multifd-channels", "1", "--timeout", str(TIMEOUT),
                                    "--workload", "counter", "--max-bandwidth", "0", "--quiet"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            killer = Killer(src, lambda: when(up, down), limit=30)
            assert _reap(src) == -signal.SIGKILL, "the source ended before it was killed"
            killer.join()
            assert killer.fired
            t0 = time.monotonic()
            code = _reap(dst)
            assert time.monotonic() - t0 < TIMEOUT * 3 + 1, "the destination outlived its source too long"
    finally:
        for proc in (src, dst):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return json.loads(djson.read_text()), code, up, down


@pytest.mark.parametrize("kind", [READY, PREPARED], ids=["after-ready", "after-prepared"])
def test_source_killed_before_commit_the_destination_discards(tmp_path: Path, kind: bytes) -> None:
    """The destination's answer (Ready, or Prepared with the guest loaded) is held in the relay while
    the source dies: no Commit ever comes, so the destination discards its guest and exits."""
    d, code, up, _ = _kill_source(tmp_path, lambda _u, down: _seen(down, kind)(), down=Tap(delay=(kind, HOLD)))
    assert not any(COMMIT in line for line in up.lines)
    assert code == 1 and d["status"] == "failed", d
    assert d["resumed"] is False and d["handover"] == protocol.D_DISCARDED and d["guest"] == "none"
    assert "progress_after" not in d
    assert "guest discarded, never run" in (tmp_path / "incoming.err").read_text()


def test_source_killed_right_after_commit_the_destination_runs(tmp_path: Path) -> None:
    """The source dies the moment its Commit is on the wire (its Resumed is swallowed, so it was
    still waiting): the destination is committed and runs the guest, alone."""
    d, code, up, down = _kill_source(tmp_path, lambda up, _d: _seen(up, COMMIT)(), down=Tap(drop=RESUMED))
    assert any(COMMIT in line for line in up.lines)
    assert code == 0 and d["status"] == "completed", d
    assert d["resumed"] is True and d["handover"] == protocol.D_RUNNING and d["guest"] == "running"
    assert d["progress_after"] > d["progress_at_resume"] > 0 and d["workload_check"] == "ok"
    assert "completed; guest resumed" in (tmp_path / "incoming.err").read_text()


# --- the source cancelled by a signal -------------------------------------------------------------
@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGINT, 130, b"interrupted"),
                                                   (signal.SIGTERM, 143, b"terminated")], ids=["SIGINT", "SIGTERM"])
def test_source_interrupted_mid_ram_aborts_and_the_destination_discards(tmp_path: Path, sig: int, code: int,
                                                                         said: bytes) -> None:
    """Ctrl-C (or SIGTERM) reaches ``livemig migrate`` while its 16 MiB move at 2 MiB/s: it sends
    Abort on the main channel and exits cancelled, its guest running to the end; the destination
    discards its guest because of the Abort (not of a closed link) and exits."""
    djson = tmp_path / "d.json"
    dst, port = _incoming(tmp_path, "--json", str(djson), "--memory", "16M")
    src: subprocess.Popen[bytes] | None = None
    down = Tap()
    try:
        with Relay(("127.0.0.1", port), down=down) as relay:
            src = subprocess.Popen([sys.executable, "-m", "livemig.cli", "migrate", relay.uri, "--guest", "portable",
                                    "--memory", "16M", "--multifd-channels", "1", "--timeout", str(TIMEOUT),
                                    "--workload", "counter", "--max-bandwidth", "2MiB/s", "--quiet"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while not _seen(down, READY)():
                assert time.monotonic() < deadline and src.poll() is None, "no Ready"
                time.sleep(0.01)
            time.sleep(1.0)  # an eighth of the way through the RAM
            src.send_signal(sig)
            _, err = src.communicate(timeout=30)
            assert src.returncode == code, err
            assert _reap(dst) == 1
    finally:
        for proc in (src, dst):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert said in err and b"the source guest is running" in err and b"Traceback" not in err, err
    assert b" MiB transferred" in err and b"16.0" not in err, err  # stopped mid-RAM
    d = json.loads(djson.read_text())
    assert d["resumed"] is False and d["handover"] == protocol.D_DISCARDED
    assert "the source aborted the migration: migration cancelled" in d["error-desc"], d
