"""``python3 -m livemig.guest.portable_measure``: the portable guest's workload rate accuracy and
pause latency (the figures quoted in :mod:`livemig.guest.portable`)."""

from __future__ import annotations

import time

import numpy as np

from .base import GuestConfig
from .portable import PortableGuest


def measure(argv: list[str] | None = None) -> int:
    """``python3 -m livemig.guest.portable_measure``: workload rate accuracy and pause latency.

    For each rate: start the guest, count progress (page writes or counter steps, read from RAM)
    over ``--seconds``, then pause/resume ``--pauses`` times at random moments and time pause().
    """
    import argparse
    import random

    from ..units import parse_size

    ap = argparse.ArgumentParser(prog="python3 -m livemig.guest.portable_measure", description=measure.__doc__)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--workload", default="dirty", choices=["dirty", "counter"])
    ap.add_argument("--rates", default="1000,10000,50000,100000,0")
    ap.add_argument("--fill", default="corpus")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--pauses", type=int, default=200)
    args = ap.parse_args(argv)
    for rate in (int(r) for r in args.rates.split(",")):
        cfg = GuestConfig(kind="portable", memory=parse_size(args.memory), smp=args.smp,
                          workload=args.workload, dirty_rate=rate, fill=args.fill)
        g = PortableGuest(cfg)
        try:
            g.start_dirty_log()
            g.start()
            time.sleep(0.2)
            p0, t0 = g.progress(), time.monotonic()
            time.sleep(args.seconds)
            p1, t1 = g.progress(), time.monotonic()
            lat = []
            for _ in range(args.pauses):
                time.sleep(random.uniform(0.0005, 0.005))
                t = time.perf_counter()
                g.pause()
                lat.append((time.perf_counter() - t) * 1e3)
                g.resume()
            g.pause()
            g.check_workload()
        finally:
            g.close()
        got = (p1 - p0) / (t1 - t0)
        err = f"{(got / rate - 1) * 100:+.1f} %" if rate else "unpaced"
        q = np.percentile(np.array(lat), [50, 99, 100])
        print(f"{args.workload} rate {rate:>7} smp {args.smp}: measured {got:11.0f}/s ({err}); "
              f"pause ms median {q[0]:.3f} p99 {q[1]:.3f} max {q[2]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(measure())
