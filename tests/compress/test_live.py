"""Live migrations between two processes with the offload methods' wire formats: qatzip at levels 1
and 9, qpl and uadk; RAM identical at switchover and the guest's counter continuing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "method", [("qatzip", "1"), ("qatzip", "9"), ("qpl", None), ("uadk", None)], ids=lambda m: "-".join(filter(None, m))
)
def test_migrates_with_identical_ram(tmp_path: Path, method: tuple[str, str | None]) -> None:
    name, level = method
    out = tmp_path / "r.json"
    dump = tmp_path / "ram"
    args = ["migrate", "--local", "--guest", "portable", "--memory", "32M", "--workload", "counter",
            "--dirty-rate", "2000", "--fill", "corpus", "--multifd-channels", "4",
            "--multifd-compression", name, "--max-bandwidth", "0", "--max-passes", "8", "--run-after", "0.3",
            "--timeout", "120",
            "--dump-ram", str(dump), "--json", str(out), "--quiet"]
    if level:
        args += ["--multifd-qatzip-level", level]
    r = subprocess.run([sys.executable, "-m", "livemig.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["status"] == "completed", res.get("error-desc")
    lm = res["livemig"]
    assert lm["method"] == name and lm["backend"].startswith(("cpu:", "hardware:"))
    if level:
        assert lm["level"] == int(level)
    assert lm["compression-ratio"] > 1.8
    d = res["destination"]
    assert d["workload_check"] == "ok" and d["progress_after"] > d["progress_at_resume"] > 0
    src = np.fromfile(dump / "src-pc.ram.bin", dtype=np.uint8)
    dst = np.fromfile(dump / "dst-pc.ram.bin", dtype=np.uint8)
    assert src.size == 32 << 20 and np.array_equal(src, dst)
