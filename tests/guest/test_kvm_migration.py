"""A KVM counter guest migrated between two processes over loopback (``livemig migrate --local``):
1 and 8 channels, each method; the destination resumes where the source stopped and continues the
sequence (its reports start right after the source's last one, checked by ``workload_check``), and
RAM is identical at switchover."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.guest.kvm.guest import _P_N, Layout
from livemig.migration.source import Source
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

MEM = 64 << 20


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


CASES = [(method, channels, 1) for method in ("none", "zlib", "zstd") for channels in (1, 8)] + [("zstd", 8, 2)]


@pytest.mark.parametrize(("method", "channels", "smp"), CASES, ids=[f"{m}-{c}ch-smp{s}" for m, c, s in CASES])
def test_kvm_counter_guest_migrates_between_processes(tmp_path: Path, method: str, channels: int,
                                                      smp: int) -> None:
    out = tmp_path / "r.json"
    dump = tmp_path / "ram"
    r = _cli("migrate", "--local", "--guest", "kvm", "--memory", str(MEM), "--smp", str(smp), "--workload", "counter",
             "--dirty-rate", "5000", "--fill", "corpus", "--multifd-channels", str(channels),
             "--multifd-compression", method, "--max-bandwidth", "0", "--run-before", "0.2",
             "--run-after", "0.3", "--dump-ram", str(dump), "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["status"] == "completed", res.get("error-desc")
    assert res["livemig"]["guest"]["kind"] == "kvm"
    assert res["livemig"]["method"] == method and res["livemig"]["channels"] == channels
    d = res["destination"]
    assert d["workload_check"] == "ok"
    assert d["progress_after"] > d["progress_at_resume"] > 0

    src = np.fromfile(dump / "src-pc.ram.bin", dtype=np.uint8)
    dst = np.fromfile(dump / "dst-pc.ram.bin", dtype=np.uint8)
    assert src.size == MEM and np.array_equal(src, dst)
    # the destination resumed from exactly the counter state the source stopped at
    lay = Layout.of(GuestConfig(kind="kvm", memory=MEM, workload="counter", smp=smp))
    ram64 = src.view(np.uint64).reshape(-1, 512)
    n_at_switchover = int(ram64[lay.params: lay.params + smp, _P_N // 8].sum())
    assert d["progress_at_resume"] == n_at_switchover


def test_source_keeps_its_kvm_guest_when_the_destination_dies(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--guest", "kvm", "--memory", str(MEM), "--multifd-channels", "2"],
                           stderr=subprocess.DEVNULL, start_new_session=True)
    guest = create_guest(GuestConfig(kind="kvm", memory=MEM, workload="counter", dirty_rate=20000, fill="corpus"))
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert time.monotonic() < deadline and dst.poll() is None
            time.sleep(0.02)
        port = int(port_file.read_text())
        guest.start()
        src = Source(guest, parse_address(f"tcp:127.0.0.1:{port}"),
                     MigrationParameters(multifd_channels=2, max_bandwidth=4 << 20), timeout=5)
        threading.Timer(0.5, lambda: os.killpg(dst.pid, signal.SIGKILL)).start()
        stats = src.run()
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
