"""``livemig bench --tls``: rows METHOD and METHOD+tls side by side with a tls/plain ratio row, the
compute limit of the plain method on both, and the TLS options on the migrate command line (a
certificate directory made on the fly that a real ``--tls-creds`` accepts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from livemig.bench.config import BenchConfig
from livemig.bench.limits import CodecSpeed, LoopbackSpeed
from livemig.bench.model import Run, aggregate
from livemig.bench.render import render_text, table_lines
from livemig.bench.results import Bench
from livemig.bench.runner import Experiment, migrate_argv, tls_experiment
from livemig.transport.tls import resolve


def result(total: float, down: float = 20, send: float = 150) -> dict[str, Any]:
    return {"status": "completed", "total-time": total, "setup-time": 5, "downtime": down,
            "ram": {"transferred": 1 << 30, "total": 1 << 30, "normal": 250000, "duplicate": 12000, "mbps": 9000,
                    "pages-per-second": 300000, "page-size": 4096},
            "livemig": {"send-cpu-percent": send, "recv-cpu-percent": 90, "wire-bytes": 300 << 20}}


def run(method: str, res: dict[str, Any] | None, **kw: Any) -> Run:
    return Run("livemig", method, 8, 1_250_000_000, 0, res, **kw)


def test_tls_rows_are_followed_by_their_ratio() -> None:
    rows = aggregate([run("zstd", result(1000, down=10, send=100)), run("zstd+tls", result(1100, down=12, send=150)),
                      run("none", result(400)), run("none+tls", None, error="TLS refused")])
    lines = table_lines(rows, 2)
    assert [cells[0] for cells in lines] == ["zstd", "zstd+tls", "tls/plain", "none", "none+tls"]
    ratio = lines[2][1:]  # none+tls failed: no ratio row for it
    assert ratio[0] == "1.10x" and ratio[1] == "1.20x" and ratio[4] == "1.50x"
    assert lines[4][1] == "error: TLS refused"
    assert "|tls/plain" in render_text(rows, 2, "8 Channels")


def test_tls_rows_get_the_plain_methods_limit() -> None:
    cfg = BenchConfig(methods=("zstd",), bandwidths=(1_250_000_000,), channels=8, memory=1 << 30, guest="kvm",
                      smp=1, workload="idle", fill="corpus", fill_label="corpus", level=1, repeat=1, tls=True)
    b = Bench({"cores": 2}, cfg, codecs={"zstd": CodecSpeed("zstd", 1, 100, 30, 400e6, 1000e6)},
              loopback=LoopbackSpeed(1 << 28, 3e9, 0.4e-9), runs=[run("zstd", result(1000)),
                                                                  run("zstd+tls", result(1100))])
    limits = {r.method: r.limit_ms for r in b.rows()}
    assert limits["zstd+tls"] is not None and limits["zstd+tls"] == limits["zstd"]


def test_tls_experiment_passes_usable_credentials(tmp_path: Path) -> None:
    exp = tls_experiment(Experiment("portable", 1 << 20, "idle", "corpus"), str(tmp_path))
    argv = migrate_argv(exp, "zstd", 8, 0, "r.json")
    obj = argv[argv.index("--object") + 1]
    assert argv[argv.index("--tls-creds") + 1] == "tls0" and "endpoint=client" in obj
    for endpoint in ("client", "server"):
        tls = resolve([obj.replace("endpoint=client", f"endpoint={endpoint}")], "tls0", endpoint=endpoint)
        assert tls is not None
        tls.context()  # every file there and loadable
    assert "--object" not in migrate_argv(Experiment("portable", 1 << 20, "idle", "corpus"), "zstd", 8, 0, "r")


@pytest.mark.slow
def test_tls_rows_are_driven_over_qmp_with_object_add() -> None:
    """--tls rows: two livemig vm processes given tls-creds-x509 objects and tls-creds over QMP."""
    proc = subprocess.run([sys.executable, "-m", "livemig.cli", "bench", "--memory", "16M", "--methods", "none",
                           "--tls", "--sample", "4M", "--json", "-"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = {r["method"]: r for r in json.loads(proc.stdout[proc.stdout.index("{"):])["runs"]}
    assert set(runs) == {"none", "none+tls"}
    for method, r in runs.items():
        assert r["error"] is None and r["extra"]["driven-over"] == "qmp", r
        adds = [line for line in r["extra"]["qmp-log"] if "object-add" in line]
        if method == "none":
            assert adds == []
        else:
            assert [a.split(":")[0] for a in adds] == ["destination", "source"]
            assert "'endpoint': 'server'" in adds[0] and "'endpoint': 'client'" in adds[1]
