"""A KVM counter guest migrated between two processes over loopback (``livemig migrate --local``):
1 and 8 channels, each method; the destination resumes where the source stopped and continues the
sequence (its reports start right after the source's last one, checked by ``workload_check``), and
RAM is identical at switchover."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from livemig.guest import GuestConfig
from livemig.guest.kvm.guest import _P_N, Layout

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

MEM = 64 << 20


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("channels", [1, 8])
@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_kvm_counter_guest_migrates_between_processes(tmp_path: Path, method: str, channels: int) -> None:
    out = tmp_path / "r.json"
    dump = tmp_path / "ram"
    r = _cli("migrate", "--local", "--guest", "kvm", "--memory", str(MEM), "--workload", "counter",
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
    lay = Layout.of(GuestConfig(kind="kvm", memory=MEM, workload="counter"))
    n_at_switchover = int(src.view(np.uint64)[(lay.params * 4096 + _P_N) // 8])
    assert d["progress_at_resume"] == n_at_switchover
