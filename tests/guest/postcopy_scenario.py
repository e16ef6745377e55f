"""A guest continued on a post-copy destination, run as a script so that a deadlock (a Python thread
faulting on a missing page while it holds the GIL stops every thread of the process) fails the
test through the subprocess timeout instead of hanging it. Used by test_postcopy_guest.py.

``python3 postcopy_scenario.py KIND WORKLOAD DISCARD [--gate] [--smp N]`` prints one JSON object.

The source guest runs, pauses, saves its state; its RAM is snapshotted. The destination gets the
snapshot, then the pages chosen by DISCARD ("all" or "half": a random half) are discarded, the
block is registered with a Userfaultfd and ``present`` set, and a :class:`Server` thread places each
faulted page from the snapshot (UFFDIO_ZEROPAGE for a zero page). The destination loads the state
and resumes; ``--gate`` holds every fault for a while first (vCPUs wait in their faults) and
checks that progress() and pause() return meanwhile. Then the guest runs with pages missing, is
checked (check_workload faults in what it reads), the rest is placed in the background, the
userfaultfd is closed and the guest is checked again.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from livemig.guest import Guest, GuestConfig, create_guest
from livemig.guest.base import RamBlock
from livemig.guest.uffd import Userfaultfd

PAGE = 4096


class Server:
    """The destination's fault thread: places each faulted page from ``snap``, then (after
    :meth:`background`) every page still missing in ascending order, as post-copy's stream does."""

    def __init__(self, uffd: Userfaultfd, block: RamBlock, snap: np.ndarray, present: np.ndarray) -> None:
        self.uffd, self.block, self.snap, self.present = uffd, block, snap, present
        self.faults: list[int] = []
        self.zero_pages = self.copied = 0
        self.gate = threading.Event()
        self.gate.set()
        self._stop = threading.Event()
        self._background = threading.Event()
        self._next = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="uffd-server", daemon=True)
        self.thread.start()

    def background(self) -> None:
        self._background.set()

    def done(self) -> bool:
        return bool(self.present.all())

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    def place(self, page: int) -> None:
        dst = self.block.address + page * PAGE
        if self.present[page]:
            self.uffd.wake(dst, PAGE)  # a fault queued just before the page was placed
            return
        if self.snap[page].any():
            self.uffd.copy(dst, self.snap.ctypes.data + page * PAGE, PAGE)
            self.copied += 1
        else:
            self.uffd.zeropage(dst, PAGE)
            self.zero_pages += 1
        self.present[page] = True

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self._background.is_set() and self._next < self.present.size
                for addr in self.uffd.read_faults(0 if busy else 0.02):
                    page = (addr - self.block.address) // PAGE
                    self.faults.append(page)
                    while not self.gate.wait(0.05):
                        if self._stop.is_set():
                            return
                    self.place(page)
                if busy:
                    for page in range(self._next, min(self._next + 256, self.present.size)):
                        if not self.present[page]:
                            self.place(page)
                    self._next += 256
        except Exception as exc:  # reported in the result
            self.error = repr(exc)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.005)


def _call(fn: Callable[[], None], errors: list[str]) -> None:
    try:
        fn()
    except Exception as exc:  # reported in the result
        errors.append(str(exc))


def _wait_progress(guest: Guest, above: int, timeout: float = 20.0) -> int:
    end = time.monotonic() + timeout
    while (p := guest.progress()) <= above:
        if time.monotonic() > end:
            raise AssertionError(f"progress stayed at {p} (waited for more than {above})")
        time.sleep(0.01)
    return p


def scenario(kind: str, workload: str, discard: str, gate: bool, smp: int, seed: int = 7) -> dict[str, Any]:
    cfg = GuestConfig(kind=kind, memory=16 << 20, smp=smp, workload=workload, dirty_rate=20000,
                      working_set=1024, seed=seed)
    out: dict[str, Any] = {}
    src = create_guest(cfg)
    try:
        src.start()
        _wait_progress(src, 2000)
        src.pause()
        src.check_workload()
        out["progress_source"] = src.progress()
        state = src.save_state()
        snap = src.blocks[0].pages.copy()
    finally:
        src.close()

    dst = create_guest(cfg, incoming=True)
    block = dst.blocks[0]
    uffd = Userfaultfd()
    server: Server | None = None
    try:
        block.pages[:] = snap  # what precopy delivered
        rng = np.random.default_rng(seed)
        missing = np.ones(block.npages, bool) if discard == "all" else rng.random(block.npages) < 0.5
        for page in np.flatnonzero(missing).tolist():
            block.discard(page, 1)
        present = ~missing
        uffd.register(block.address, block.size)
        block.present = present
        server = Server(uffd, block, snap, present)
        dst.load_state(state)
        if gate:
            server.gate.clear()  # faults wait: the vCPUs block in them
        out["progress_before_resume"] = dst.progress()  # never waits for a page
        dst.resume()
        if gate:
            _wait(lambda: len(server.faults) > 0, "a vCPU fault while the gate is closed")
            out["progress_while_gated"] = dst.progress()  # never waits for a page
            errors: list[str] = []
            pauser = threading.Thread(target=_call, args=(dst.pause, errors), daemon=True)
            pauser.start()
            # portable: a vCPU waiting for a page is outside its batch, pause() returns at once;
            # KVM: whether a signal ends the vCPU's wait in KVM_RUN depends on the host's MMU
            pauser.join(2.0)
            out["paused_while_gated"] = not pauser.is_alive()
            server.gate.set()
            pauser.join(15.0)
            out["paused"] = not pauser.is_alive() and not errors
            out["pause_errors"] = errors
            dst.resume()
        out["progress_running"] = _wait_progress(dst, out["progress_source"])
        dst.check_workload()  # with pages still missing: faults in what it reads
        out["missing_at_check"] = int((~present).sum())
        server.background()
        end = time.monotonic() + 30
        while not server.done():
            if time.monotonic() > end or server.error:
                raise AssertionError(f"pages not all placed: {server.error}")
            time.sleep(0.01)
        block.present = None
        uffd.close()
        out["progress_after"] = _wait_progress(dst, out["progress_running"])
        dst.pause()
        dst.check_workload()
        out["progress_final"] = dst.progress()
        out["faults"] = sorted(set(server.faults))
        out["faults_not_missing"] = sorted(set(server.faults) - set(np.flatnonzero(missing).tolist()))
        out["missing"] = int(missing.sum())
        # where the workload keeps the state progress() reads: page 0, or the KVM parameter pages
        params = getattr(getattr(dst, "layout", None), "params", 0)
        out["state_pages"] = list(range(params, params + smp)) if kind == "kvm" else [0]
        out["zero_pages"], out["copied"] = server.zero_pages, server.copied
        out["server_error"] = server.error
    finally:
        if server is not None:
            server.stop()
        uffd.close()
        dst.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("workload")
    ap.add_argument("discard", choices=["all", "half"])
    ap.add_argument("--gate", action="store_true")
    ap.add_argument("--smp", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(scenario(a.kind, a.workload, a.discard, a.gate, a.smp)))


if __name__ == "__main__":
    main()
