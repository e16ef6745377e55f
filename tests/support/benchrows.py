"""Bench test helpers: fake migration results, table cells, a Bench with measured speeds, and
``livemig bench`` options as the command line would parse them."""

from __future__ import annotations

import argparse
from typing import Any

from livemig.bench import cli as bench_cli
from livemig.bench.config import BenchConfig
from livemig.bench.limits import CodecSpeed, LoopbackSpeed
from livemig.bench.model import Run
from livemig.bench.results import Bench, DataSample

GIB = 1 << 30


def result(
    total: float,
    down: float = 20,
    mbps: float = 9000,
    pps: float = 300000,
    send: float = 150,
    recv: float = 90,
    wire: float = 300 << 20,
    smem: float = 10 << 20,
    rmem: float = 12 << 20,
    backend: str = "cpu: zstd 1.5.5",
    accelerated: bool = False,
) -> dict[str, Any]:
    return {
        "status": "completed",
        "total-time": total,
        "setup-time": 5,
        "downtime": down,
        "ram": {"transferred": 1 << 30, "total": 1 << 30, "normal": 250000, "duplicate": 12000,
                "mbps": mbps, "pages-per-second": pps, "page-size": 4096},  # fmt: skip
        "livemig": {"method": "zstd", "level": 1, "backend": backend, "accelerated": accelerated, "channels": 8,
                    "wire-bytes": wire, "send-cpu-percent": send, "recv-cpu-percent": recv,
                    "send-mem-bytes": smem, "recv-mem-bytes": rmem},  # fmt: skip
    }


def run(method: str, res: dict[str, Any] | None, rep: int = 0, **kw: Any) -> Run:
    return Run("livemig", method, kw.pop("channels", 8), kw.pop("bw", 1_250_000_000), rep, res, **kw)


def data_cells(text: str, label: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in\n{text}")


def bench_of(runs: list[Run], bandwidths: tuple[int, ...] = (1_250_000_000,)) -> Bench:
    host = {"cores": 2, "cpu-model": "Test CPU", "kernel": "6.1", "memory": 1 << 34, "kvm": True}
    cfg = BenchConfig(methods=("qatzip", "zstd", "none"), bandwidths=bandwidths, channels=8, memory=GIB,
                      guest="kvm", smp=1, workload="idle", fill="corpus", fill_label="the built-in corpus",
                      level=1, repeat=1,
                      unavailable=(("qatzip", "no QAT"), ("zstd", None), ("none", None)))  # fmt: skip
    b = Bench(host, cfg, data=DataSample(32 << 20, 0.02, 3.24))
    b.codecs["zstd"] = CodecSpeed("zstd", 1, 100, 30, 400e6, 1000e6)
    b.codecs["none"] = CodecSpeed("none", 1, 100, 100, float("inf"), float("inf"))
    b.loopback = LoopbackSpeed(1 << 28, 3e9, 0.4e-9)
    b.runs = runs
    return b


def bench_args(**kw: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    bench_cli.add_commands(sub)
    argv = ["bench"]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return parser.parse_args(argv)
