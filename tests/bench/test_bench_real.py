"""A small real bench: two methods, 256 MiB, one repeat, table + JSON + plots from real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
        # driven over QMP, as QEMU is: two livemig vm processes, the destination deferred
        bench = r["extra"]
        assert bench["driven-over"] == "qmp" and bench["dst-status"] == "completed"
        assert bench["dst-vm-status"]["status"] == "running"
        dst_argv = bench["argv"][0]
        assert dst_argv[dst_argv.index("vm"):][-4:] == ["--incoming", "defer", "--name", "livemig-bench-dst"]
        log = bench["qmp-log"]
        assert log.index("destination: migrate-incoming {'uri': 'tcp:127.0.0.1:4445'}") \
            < log.index("source: migrate {'uri': 'tcp:127.0.0.1:4445'}") \
            < log.index("source: event MIGRATION completed") < log.index("destination: event MIGRATION completed")
        assert f"source: migrate-set-parameters {{'multifd-channels': 8, 'multifd-compression': '{method}'" in \
            "\n".join(log)
    # compression sends fewer bytes than none, and both sent at least their compressed RAM
    assert runs["zstd"]["result"]["livemig"]["wire-bytes"] < runs["none"]["result"]["livemig"]["wire-bytes"]
    assert runs["none"]["result"]["livemig"]["wire-bytes"] >= 0.9 * (256 << 20)
    assert doc["data"]["zstd-1-ratio"] > 1.5
    written = sorted(os.listdir(plots))
    assert written == ["pps-vs-bandwidth.png", "time-cpu.png", "wire-bytes.png"]
    for name in written:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {plots / name}" in proc.stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_leaves_nothing_behind() -> None:
    from livemig.bench.procs import descendants

    # a fresh interpreter with SIGINT at its default (a test runner may ignore it), like a terminal's Ctrl-C
    boot = "import signal,os,sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", boot, sys.executable, "-m", "livemig.cli", "bench", "--memory", "512M",
         "--methods", "none", "--sample", "4M", "--repeat", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    tree: list[int] = []
    deadline = time.monotonic() + 60
    # wait until the migration's source and destination processes both run
    while time.monotonic() < deadline and proc.poll() is None:
        tree = descendants(proc.pid)
        if len([p for p in tree if "incoming" in _cmdline(p)]) >= 1:
            break
        time.sleep(0.05)
    assert any("incoming" in _cmdline(p) for p in tree), "the bench never started a migration"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.endswith("livemig bench: interrupted\nlivemig bench: child processes stopped\n"), err
    time.sleep(0.2)
    assert [p for p in tree if _alive(p)] == []
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"livemig-bench-{proc.pid}-")]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_qemu_peer_migrates_over_qmp(tmp_path: Path) -> None:
    """One real QEMU-to-QEMU multifd migration driven over QMP (qemu.qmp), as ``--peer qemu`` runs it."""
    import shutil

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (scripts/install-qemu installs it)")
    from livemig.bench.procs import Children
    from livemig.bench.qemu_peer import QemuPeer
    from livemig.bench.runner import Experiment

    exp = Experiment("portable", 32 << 20, "idle", "corpus", timeout=120)
    with Children() as ch:
        peer = QemuPeer(ch, exp, str(tmp_path), None)
        try:
            run = peer.run("zstd", 2, 0, 0)
            ram_file = peer.ram_file
        finally:
            peer.close()
    assert run.ok, run.error or run.na
    assert run.result is not None and run.result["status"] == "completed"
    assert run.result["ram"]["total"] >= 32 << 20 and run.result["total-time"] > 0  # RAM + firmware ROMs
    assert run.extra["dst-status"] == "completed"
    assert run.extra["dst-vm-status"]["status"] == "running"  # the destination took over
    assert ram_file is not None and not os.path.exists(ram_file)  # close() removed the /dev/shm file


@pytest.mark.slow
def test_json_dash_is_stdout_and_one_channel_is_singular() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "livemig.cli", "bench", "--memory", "8M", "--methods", "none", "--multifd-channels",
         "1", "--sample", "1M", "--no-netns", "--json", "-"],
        capture_output=True, text=True, timeout=300, cwd="/tmp",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists("/tmp/-")  # no file named '-'
    doc = json.loads(proc.stdout)  # stdout is the JSON alone
    assert doc["runs"][0]["method"] == "none" and doc["runs"][0]["error"] is None
    err = proc.stderr  # the tables and progress
    assert "livemig none, 1 channel, 10Gbps" in err and "Link: 1 multifd channel over loopback" in err
    assert "|1 Channel " in err and "1 channels" not in err and "1 Channels" not in err
