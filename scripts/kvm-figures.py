#!/usr/bin/env python3
"""Speed figures of the KVM guest (issue 3): dirty-log sync, pause latency, dirty rate accuracy.

    python3 scripts/kvm-figures.py                 # all, 1 GiB sync guest
    python3 scripts/kvm-figures.py --only sync --memory 1G
    python3 scripts/kvm-figures.py --only pause --cycles 300

Prints one line per figure and, with --json FILE, writes them as JSON. Targets: sync of 1 GiB fully
dirty < 10 ms, pause latency < 2 ms. Downtime figures need the migration engine
(``livemig migrate --local --guest kvm ...``); see --only downtime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from livemig.guest import GuestConfig, create_guest  # noqa: E402
from livemig.guest.kvm import KvmGuest  # noqa: E402
from livemig.units import parse_size  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _kvm(cfg: GuestConfig) -> KvmGuest:
    g = create_guest(cfg)
    assert isinstance(g, KvmGuest)
    return g


def sync_figures(memory: int, rounds: int) -> dict[str, Any]:
    """Time sync_dirty_log() on a paused guest whose whole RAM (but its own pages) was written."""
    g = _kvm(GuestConfig(kind="kvm", memory=memory, workload="dirty", dirty_rate=0, fill="zero"))
    try:
        g.blocks[0].prefault()
        ws = g.layout.working_set
        g.start_dirty_log()
        g.start()
        t0 = time.monotonic()
        while g.progress() < ws:  # first pass also maps every page into the VM (slow when nested)
            time.sleep(0.05)
        first_pass = time.monotonic() - t0
        g.pause()
        g.sync_dirty_log()
        empty = []
        for _ in range(rounds):
            t = time.perf_counter()
            g.sync_dirty_log()
            empty.append((time.perf_counter() - t) * 1e3)
        full, full_cpu, npages = [], [], 0
        for _ in range(rounds):
            target = g.progress() + ws
            g.resume()
            while g.progress() < target:
                time.sleep(0.01)
            g.pause()
            t, c = time.perf_counter(), time.thread_time()
            pages = g.sync_dirty_log()["pc.ram"]
            full.append((time.perf_counter() - t) * 1e3)
            full_cpu.append((time.thread_time() - c) * 1e3)  # CPU time: wall time minus waiting for a core
            npages = pages.size
        # the same while the guest runs and dirties its whole working set
        g.resume()
        running = []
        for _ in range(rounds):
            time.sleep(0.2)
            t = time.perf_counter()
            n = g.sync_dirty_log()["pc.ram"].size
            running.append(((time.perf_counter() - t) * 1e3, n))
        g.pause()
        return {"memory": memory, "dirty_pages": int(npages), "first_pass_s": round(first_pass, 2),
                "sync_full_ms_median": round(statistics.median(full), 3), "sync_full_ms_min": round(min(full), 3),
                "sync_full_ms_max": round(max(full), 3),
                "sync_full_cpu_ms_median": round(statistics.median(full_cpu), 3),
                "sync_empty_ms_median": round(statistics.median(empty), 3),
                "sync_running_ms": [(round(ms, 3), n) for ms, n in running]}
    finally:
        g.close()


def pause_figures(cycles: int) -> dict[str, Any]:
    """Pause latency (pause() call to return) for a busy counter guest and an idle guest, smp 1 and 2."""
    out: dict[str, Any] = {}
    for workload, smp, rate in (("counter", 1, 0), ("counter", 2, 0), ("dirty", 1, 20000), ("idle", 1, 0),
                                ("idle", 2, 0)):
        g = _kvm(GuestConfig(kind="kvm", memory=128 << 20, workload=workload, smp=smp, dirty_rate=rate,
                             working_set=4096 if workload != "idle" else 0))
        try:
            g.start()
            time.sleep(0.1)
            lat = []
            for _ in range(cycles):
                time.sleep(0.002)
                t = time.perf_counter()
                g.pause()
                lat.append((time.perf_counter() - t) * 1e3)
                g.resume()
            g.pause()
            g.check_workload()
            out[f"{workload}-smp{smp}"] = {"median_ms": round(statistics.median(lat), 3),
                                           "p99_ms": round(_pct(lat, 0.99), 3), "max_ms": round(max(lat), 3)}
        finally:
            g.close()
    return out


def state_figures(cycles: int) -> dict[str, Any]:
    """save_state / load_state (into a second, incoming VM) / resume times of a paused counter guest."""
    cfg = GuestConfig(kind="kvm", memory=64 << 20, workload="counter", smp=2, dirty_rate=20000)
    src = _kvm(cfg)
    dst = create_guest(GuestConfig.from_json(cfg.to_json()), incoming=True)
    try:
        src.start()
        time.sleep(0.1)
        src.pause()
        save, load = [], []
        for _ in range(cycles):
            t = time.perf_counter()
            blob = src.save_state()
            save.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            dst.load_state(blob)
            load.append((time.perf_counter() - t) * 1e3)
        dst.blocks[0].pages[:] = src.blocks[0].pages
        t = time.perf_counter()
        dst.resume()
        resume_ms = (time.perf_counter() - t) * 1e3
        time.sleep(0.1)
        dst.pause()
        dst.check_workload()
        return {"smp": 2, "blob_bytes": len(blob), "save_ms_median": round(statistics.median(save), 3),
                "load_ms_median": round(statistics.median(load), 3), "resume_ms": round(resume_ms, 3)}
    finally:
        src.close()
        dst.close()


def rate_figures() -> dict[str, Any]:
    """Achieved dirty rate (distinct pages per second in the log) for a few requested rates."""
    out: dict[str, Any] = {}
    for rate in (1000, 20000, 100000, 0):
        g = _kvm(GuestConfig(kind="kvm", memory=512 << 20, workload="dirty", dirty_rate=rate, fill="zero"))
        try:
            g.blocks[0].prefault()
            g.start()
            g.start_dirty_log()
            time.sleep(0.5)  # map the first pages
            g.sync_dirty_log()
            t0 = time.monotonic()
            p0 = g.progress()
            total = 0
            for _ in range(5):
                time.sleep(0.2)
                total += g.sync_dirty_log()["pc.ram"].size
            dt = time.monotonic() - t0
            steps = g.progress() - p0
            g.pause()
            out[str(rate or "unlimited")] = {"steps_per_s": round(steps / dt), "dirty_pages_per_s": round(total / dt)}
        finally:
            g.close()
    return out


def idle_cpu() -> dict[str, Any]:
    """Process CPU seconds per second while an idle 2-vCPU guest runs."""
    g = _kvm(GuestConfig(kind="kvm", memory=128 << 20, workload="idle", smp=2))
    try:
        g.start()
        time.sleep(0.1)
        t0 = os.times()
        time.sleep(2.0)
        t1 = os.times()
        return {"cpu_percent": round(((t1.user + t1.system) - (t0.user + t0.system)) / 2.0 * 100, 2)}
    finally:
        g.close()


def downtime_figures(args: argparse.Namespace) -> dict[str, Any]:
    """Downtime through the engine: idle 2 GiB guest, and a guest dirtying 20,000 pages/s."""
    out: dict[str, Any] = {}
    cases = {"idle-2G": ["--memory", "2G", "--workload", "idle"],
             "dirty-20k": ["--memory", args.dirty_memory, "--workload", "dirty", "--dirty-rate", "20000"]}
    for name, extra in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "livemig.cli", "migrate", "--local", "--guest", "kvm", *extra,
                   "--multifd-channels", str(args.channels), "--fill", args.fill, "--json", str(result),
                   "--quiet"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if not result.exists():
                out[name] = {"error": (proc.stderr or proc.stdout).strip()[-500:], "command": " ".join(cmd)}
                continue
            r = json.loads(result.read_text())
            out[name] = {"status": r.get("status"), "downtime_ms": r.get("downtime"),
                         "total_ms": r.get("total-time"), "dirty_sync_count": r.get("ram", {}).get("dirty-sync-count"),
                         "destination": r.get("destination"), "command": " ".join(cmd[2:])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["sync", "pause", "state", "rate", "idle", "downtime"], action="append")
    ap.add_argument("--memory", default="1G", help="guest RAM for the sync figure (default 1G)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--fill", default="zero")
    ap.add_argument("--dirty-memory", default="1G")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    which = args.only or ["sync", "pause", "state", "rate", "idle"]
    figures: dict[str, Any] = {}
    if "sync" in which:
        figures["sync"] = sync_figures(parse_size(args.memory), args.rounds)
        print("sync:", json.dumps(figures["sync"]), flush=True)
    if "pause" in which:
        figures["pause"] = pause_figures(args.cycles)
        print("pause:", json.dumps(figures["pause"]), flush=True)
    if "state" in which:
        figures["state"] = state_figures(50)
        print("state:", json.dumps(figures["state"]), flush=True)
    if "rate" in which:
        figures["rate"] = rate_figures()
        print("rate:", json.dumps(figures["rate"]), flush=True)
    if "idle" in which:
        figures["idle"] = idle_cpu()
        print("idle:", json.dumps(figures["idle"]), flush=True)
    if "downtime" in which:
        figures["downtime"] = downtime_figures(args)
        print("downtime:", json.dumps(figures["downtime"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    _ = np  # numpy is imported for the guest module's sake


if __name__ == "__main__":
    main()
