"""Migrations between two processes, shared by the portable-guest and KVM-guest tests, and one in
this process over a socket pair (:func:`in_process`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from livemig.guest import Guest, GuestConfig, create_guest
from livemig.migration.destination import Destination
from livemig.migration.source import Source
from livemig.migration.stats import MigrationStats
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from livemig.transport.sockets import SocketPairLink


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``livemig ARGS`` in a child process of its own session. On timeout the whole session is killed
    (a ``--local`` destination grandchild included, which would otherwise hold the output pipes open)."""
    proc = subprocess.Popen([sys.executable, "-m", "livemig.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"livemig {' '.join(args)} ran past {timeout} s\n{out}{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def migrate_local(tmp_path: Path, memory: int, *args: str) -> tuple[dict[str, Any], np.ndarray]:
    """``livemig migrate --local`` of a counter guest; checks that it completed, that the guest goes on
    at the destination and passes its workload check, and that RAM was identical at switchover.
    Returns the result JSON and the source RAM at switchover."""
    out, dump = tmp_path / "r.json", tmp_path / "ram"
    r = cli("migrate", "--local", "--memory", str(memory), "--workload", "counter", "--fill", "corpus",
            "--max-bandwidth", "0", "--max-passes", "8", "--run-after", "0.3", "--dump-ram", str(dump),
            "--json", str(out),
            "--quiet", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    res: dict[str, Any] = json.loads(out.read_text())
    assert res["status"] == "completed", res.get("error-desc")
    d = res["destination"]
    assert d["workload_check"] == "ok"
    assert d["progress_after"] > d["progress_at_resume"] > 0
    src = np.fromfile(dump / "src-pc.ram.bin", dtype=np.uint8)
    dst = np.fromfile(dump / "dst-pc.ram.bin", dtype=np.uint8)
    assert src.size == memory and np.array_equal(src, dst)
    return res, src


def killed_destination_leaves_source_running(tmp_path: Path, config: GuestConfig) -> None:
    """Kill the destination process mid-migration: the source fails in bounded time, its guest runs on."""
    port_file = tmp_path / "port"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--guest", config.kind, "--memory", str(config.memory),
                            "--multifd-channels", "2"],
                           stderr=subprocess.DEVNULL, start_new_session=True)
    guest = create_guest(config)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert time.monotonic() < deadline and dst.poll() is None
            time.sleep(0.02)
        guest.start()
        src = Source(guest, parse_address(f"tcp:127.0.0.1:{int(port_file.read_text())}"),
                     MigrationParameters(multifd_channels=2, max_bandwidth=4 << 20), timeout=5)
        threading.Timer(0.5, lambda: os.killpg(dst.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        stats = src.run()
        assert time.monotonic() - t0 < 10
        assert stats.status == "failed" and stats.error
        assert guest.running
        before = guest.progress()
        time.sleep(0.2)
        assert guest.progress() > before
        guest.check_workload()
    finally:
        guest.close()
        if dst.poll() is None:
            os.killpg(dst.pid, signal.SIGKILL)
        dst.wait()


def in_process(src: Guest, dst_guest: Guest, src_params: MigrationParameters,
               dst_params: MigrationParameters | None = None) -> tuple[MigrationStats, dict[str, Any]]:
    """Migrate ``src`` (started here) into ``dst_guest`` over a socket pair, both ends in threads of
    this process: (the source's statistics, the destination's result). A destination still waiting
    after a failed source (a refused one waits for another) is cancelled."""
    link = SocketPairLink()
    dst = Destination(link, dst_params or src_params, guest=dst_guest, timeout=10)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()))
    t.start()
    src.start()
    stats = Source(src, link, src_params, timeout=10).run()
    if stats.status != "completed":
        dst.cancel()
    t.join(timeout=30)
    assert not t.is_alive()
    return stats, out
