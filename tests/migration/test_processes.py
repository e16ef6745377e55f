"""Live migrations between two processes (``livemig migrate --local``) of a dirtying portable
guest: every method with 1 and 8 channels, RAM identical at switchover, the counter continuing on
the destination; and a destination killed mid-migration leaves the source guest running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.migration.source import Source
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("channels", [1, 8])
@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_counter_guest_migrates_between_processes(tmp_path: Path, method: str, channels: int) -> None:
    out = tmp_path / "r.json"
    dump = tmp_path / "ram"
    r = _cli("migrate", "--local", "--guest", "portable", "--memory", "32M", "--workload", "counter",
             "--dirty-rate", "5000", "--fill", "corpus", "--multifd-channels", str(channels),
             "--multifd-compression", method, "--max-bandwidth", "0", "--run-after", "0.3",
             "--dump-ram", str(dump), "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["status"] == "completed"
    assert res["livemig"]["method"] == method and res["livemig"]["channels"] == channels
    d = res["destination"]
    assert d["workload_check"] == "ok"
    assert d["progress_after"] > d["progress_at_resume"] > 0
    src = np.fromfile(dump / "src-pc.ram.bin", dtype=np.uint8)
    dst = np.fromfile(dump / "dst-pc.ram.bin", dtype=np.uint8)
    assert src.size == 32 << 20 and np.array_equal(src, dst)
    ram = res["ram"]
    assert ram["normal"] + ram["duplicate"] >= (32 << 20) // 4096
    assert ram["dirty-sync-count"] >= 2
    if method != "none":
        assert res["livemig"]["compression-ratio"] > 2.0


def test_killed_destination_leaves_source_guest_running(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    params = MigrationParameters(multifd_channels=2, max_bandwidth=4 << 20)
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--guest", "portable", "--memory", "64M", "--multifd-channels", "2"],
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert time.monotonic() < deadline and dst.poll() is None
            time.sleep(0.02)
        port = int(port_file.read_text())
        guest = create_guest(GuestConfig(kind="portable", memory=64 << 20, workload="counter", fill="corpus"))
        guest.start()
        src = Source(guest, parse_address(f"tcp:127.0.0.1:{port}"), params, timeout=5)
        import threading

        threading.Timer(0.5, lambda: os.killpg(dst.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        stats = src.run()
        assert time.monotonic() - t0 < 10
        assert stats.status == "failed"
        assert stats.error
        assert guest.running
        before = guest.progress()
        time.sleep(0.2)
        assert guest.progress() > before
        guest.check_workload()
        guest.close()
    finally:
        if dst.poll() is None:
            os.killpg(dst.pid, signal.SIGKILL)
        dst.wait()


def test_bad_parameter_refused_before_anything_starts() -> None:
    r = _cli("migrate", "--local", "--multifd-channels", "0", "--memory", "16M")
    assert r.returncode != 0
    assert "Parameter 'multifd_channels' expects a value between 1 and 255" in r.stderr
