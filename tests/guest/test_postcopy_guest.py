"""Guests on a post-copy destination: RAM registered with userfaultfd in missing mode, pages placed
by a serving thread, and no Python access to RAM that could fault while holding the GIL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.guest.base import RamBlock
from livemig.guest.uffd import Userfaultfd, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")
PAGE = 4096


def test_ensure_pages_faults_in_only_missing_pages() -> None:
    block = RamBlock("t", 32 * PAGE)
    src = np.random.default_rng(1).integers(0, 256, (32, PAGE), dtype=np.uint8)
    block.pages[:] = src
    block.ensure_pages(np.arange(32))  # present is None: nothing to do, nothing registered
    block.discard(4, 20)
    present = np.ones(32, dtype=bool)
    present[4:24] = False
    block.present = present
    uffd = Userfaultfd()
    uffd.register(block.address, block.size)
    seen: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for addr in uffd.read_faults(0.05):
                page = (addr - block.address) // PAGE
                seen.append(page)
                uffd.copy(block.address + page * PAGE, src.ctypes.data + page * PAGE, PAGE)
                present[page] = True

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert not block.pages_present(np.array([0, 5])) and block.pages_present(np.array([0, 30]))
        block.ensure_pages(np.array([[7, 0], [9, 8]]))  # any shape; 0 is present
        block.ensure_range(20, 6)
        block.ensure_bytes(11 * PAGE + 100, PAGE)  # pages 11 and 12
        block.ensure_pages(np.array([7, 9]))  # present now: no fault
        assert sorted(seen) == [7, 8, 9, 11, 12, 20, 21, 22, 23]
        assert (block.pages[[7, 8, 9, 11, 12, 20, 23]] == src[[7, 8, 9, 11, 12, 20, 23]]).all()
    finally:
        stop.set()
        t.join(timeout=5)
        uffd.close()
        block.close()


SCENARIO = Path(__file__).with_name("postcopy_scenario.py")


def run_scenario(*args: str) -> dict[str, Any]:
    """postcopy_scenario.py in a subprocess: a GIL deadlock stops every thread of its process, so only
    the subprocess timeout turns it into a failure."""
    try:
        proc = subprocess.run([sys.executable, str(SCENARIO), *args], capture_output=True, text=True,
                              timeout=180, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"post-copy scenario {args} hung (deadlock?): {exc.stderr!r}") from exc
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def check_continued(r: dict[str, Any]) -> None:
    """The destination continued from where the source stopped, faulting only missing pages."""
    assert r["server_error"] is None
    assert r["faults"] and r["faults_not_missing"] == []
    assert r["progress_before_resume"] in (0, r["progress_source"])  # 0: page 0 missing, never waited for
    assert r["progress_source"] < r["progress_running"] < r["progress_after"] == r["progress_final"]
    assert r["zero_pages"] > 0 and r["copied"] > 0
    assert r["copied"] + r["zero_pages"] == r["missing"]  # every missing page placed exactly once


CASES = [(kind, workload, discard) for kind in ("portable", "kvm") for workload, discard in
         (("counter", "all"), ("counter", "half"), ("dirty", "all"), ("dirty", "half"))]


@pytest.mark.parametrize(("kind", "workload", "discard"), [
    pytest.param(*c, marks=[pytest.mark.kvm] if c[0] == "kvm" else [], id="-".join(c)) for c in CASES])
def test_guest_continues_on_a_postcopy_destination(kind: str, workload: str, discard: str) -> None:
    r = run_scenario(kind, workload, discard)
    check_continued(r)
    if discard == "all":
        assert set(r["state_pages"]) <= set(r["faults"])  # the workload's state: faulted, not read


@pytest.mark.parametrize("kind", [pytest.param("portable"), pytest.param("kvm", marks=pytest.mark.kvm)])
def test_progress_and_pause_do_not_wait_for_missing_pages(kind: str) -> None:
    """Faults held unanswered: progress() returns at once (the last value it read), pause() returns
    (portable: a vCPU waiting for a page is outside its batch; KVM: at the latest once the page is
    placed), and the guest then continues correctly."""
    r = run_scenario(kind, "counter", "all", "--gate", "--smp", "2")
    check_continued(r)
    assert r["progress_while_gated"] == 0
    assert r["paused"] and r["pause_errors"] == []
    if kind == "portable":
        assert r["paused_while_gated"]
