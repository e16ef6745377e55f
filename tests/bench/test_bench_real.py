"""A small real bench: two methods, 256 MiB, one repeat, table + JSON + plots from real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_small_real_bench(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    plots = tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, "-m", "livemig.cli", "bench", "--memory", "256M", "--repeat", "1", "--methods", "zstd,none",
         "--sample", "8M", "--json", str(out), "--plot", str(plots), "--markdown"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(out.read_text())
    runs = {r["method"]: r for r in doc["runs"]}
    assert set(runs) == {"zstd", "none"}
    for method, r in runs.items():
        assert r["error"] is None and r["result"]["status"] == "completed", r
        res = r["result"]
        assert res["ram"]["total"] == 256 << 20
        # the printed row is the run's own figures
        row = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{res['total-time']:.0f}" and cells[2] == f"{res['downtime']:.0f}"
        assert cells[4] == f"{res['ram']['pages-per-second']:.0f}"
        assert cells[5] == f"{res['livemig']['send-cpu-percent']:.0f}"
    # compression sends fewer bytes than none, and both sent at least their compressed RAM
    assert runs["zstd"]["result"]["livemig"]["wire-bytes"] < runs["none"]["result"]["livemig"]["wire-bytes"]
    assert runs["none"]["result"]["livemig"]["wire-bytes"] >= 0.9 * (256 << 20)
    assert doc["data"]["zstd-1-ratio"] > 1.5
    written = sorted(os.listdir(plots))
    assert written == ["pps-vs-bandwidth.png", "time-cpu.png", "wire-bytes.png"]
    for name in written:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {plots / name}" in proc.stdout
