#!/usr/bin/env python3
"""Codec speed of every compression method and level, as the migration channels run them.

Each method compresses the sample in 512 KiB packets (128 pages, MULTIFD_PACKET_SIZE) through
``create_method(name, level).compressor(0)`` and decompresses through ``.decompressor(0)``: the same
calls the multifd channels make, including payload framing. Figures are MB/s of page data (10^6
bytes of input per second), best of ``--repeat`` runs, on one core; ``N-thr`` are the aggregate
compress and decompress rates of N threads at once (default: as many as cores), each with its own
channel state: what the cores really give when all are busy (here two threads reach ~1.55x one,
not 2x), and what ``livemig advise``, the bench's limit column and ``multifd-compression auto``
use (livemig.accel.speed). Ratio = page bytes / payload bytes.

    python3 scripts/codec-speed.py                      # built-in corpus fill, 32 MiB
    python3 scripts/codec-speed.py --fill files:DIR --size 64M   # RAM-like data from the files of DIR
    python3 scripts/codec-speed.py --methods qatzip --levels 1-9
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from livemig.accel.sample import sample_pages  # noqa: E402
from livemig.accel.speed import Measurement, measure  # noqa: E402
from livemig.compress import get_method, method_names  # noqa: E402
from livemig.errors import MigrationError  # noqa: E402
from livemig.units import parse_size  # noqa: E402

PAGE = 4096
PACKET_PAGES = 128

DEFAULT_LEVELS = {"zlib": [1, 6, 9], "zstd": [1, 3, 9], "qatzip": list(range(1, 10))}


def parse_levels(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fill", default="corpus", help="corpus (default), mixed, zero, random, files:DIR, image:PATH")
    ap.add_argument("--size", default="32M", help="sample size (default 32M)")
    ap.add_argument("--methods", default=",".join(method_names()), help="comma-separated (default: all)")
    ap.add_argument("--levels", help="levels for methods with levels, e.g. 1-9 or 1,3,9 (default per method)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads at once of the aggregate columns (default: the cores; 0: skip)")
    args = ap.parse_args()

    size = parse_size(args.size)
    npages = max(PACKET_PAGES, size // PAGE)
    t = time.perf_counter()
    data = sample_pages(npages, args.fill, seed=0)
    print(f"sample: {args.fill}, {len(data) / 2**20:.0f} MiB in {PACKET_PAGES}-page packets "
          f"(made in {time.perf_counter() - t:.1f} s); host: {os.cpu_count()} cpus; best of {args.repeat}")

    cases: list[tuple[str, int, bool]] = []
    for name in args.methods.split(","):
        try:
            cls = get_method(name)
        except MigrationError as exc:
            print(f"{name}: unavailable: {exc}")
            continue
        if cls.levels is None:
            levels = [1]
        elif args.levels:
            levels = [lv for lv in parse_levels(args.levels) if cls.levels[0] <= lv <= cls.levels[1]]
        else:
            levels = DEFAULT_LEVELS.get(name, [cls.levels[0]])
        cases.extend((name, lv, cls.levels is None) for lv in levels)

    # rounds over all cases (not all repeats of one case in a row): on a shared, noisy host every
    # case then sees the same spread of load, and the best of the rounds is compared
    best: dict[tuple[str, int], Measurement] = {}
    for _ in range(args.repeat):
        for name, level, _ in cases:
            m = measure(name, level, data, threads=args.threads, repeat=1)
            old = best.get((name, level))
            if old is None:
                best[(name, level)] = m
            else:
                old.compress_rate = max(old.compress_rate, m.compress_rate)
                old.decompress_rate = max(old.decompress_rate, m.decompress_rate)
                old.compress_rate_parallel = max(old.compress_rate_parallel, m.compress_rate_parallel)
                old.decompress_rate_parallel = max(old.decompress_rate_parallel, m.decompress_rate_parallel)

    thr, dthr = f"{args.threads}-thr comp", f"{args.threads}-thr dec"
    head = f"{'method':8} {'level':>5} {'comp MB/s':>9} {'dec MB/s':>9} {'ratio':>6} {thr:>11} {dthr:>10}  backend"
    print(head)
    print("-" * len(head))
    for name, level, nolevel in cases:
        m = best[(name, level)]
        agg = (f"{m.compress_rate_parallel / 1e6:11.0f} {m.decompress_rate_parallel / 1e6:10.0f}"
               if args.threads > 0 else "")
        lv = "-" if nolevel else str(level)
        print(f"{name:8} {lv:>5} {m.compress_rate / 1e6:9.0f} {m.decompress_rate / 1e6:9.0f} "
              f"{m.ratio:6.3f} {agg:>22}  {m.backend[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
