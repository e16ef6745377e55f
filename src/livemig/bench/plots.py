"""PNG plots of a bench (matplotlib, Agg backend: no display needed).

* ``time-cpu.png``: median total time per method (bars with min..max whiskers, the compute limit
  as a red mark) and each side's CPU % per method.
* ``pps-vs-bandwidth.png``: pages per second against the link cap, one line per method (and
  QEMU); with a single bandwidth, a bar per method with the cap in the title (a sweep such as
  ``--bandwidth 1Gbps,10Gbps,0`` draws the lines).
* ``wire-bytes.png``: bytes really sent per method (socket payload, else the engine's wire-bytes),
  with the guest's RAM size as a line.

With several bandwidths, the time/CPU and wire plots show the first.
"""

from __future__ import annotations

import os
from typing import Any

from .model import Row
from .render import bandwidth_label
from .results import Bench

MIB = 1 << 20


def _label(row: Row) -> str:
    return row.method if row.peer == "livemig" else f"{row.method} (QEMU)"


def _save(fig: Any, outdir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(outdir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _time_cpu(bench: Bench, base: list[Row], title: str, outdir: str) -> str:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [_label(r) for r in base]
    xs = list(range(len(base)))
    med = [r.value("total-time") or 0.0 for r in base]
    stats = [r.stats.get("total-time") for r in base]
    if bench.config.repeat > 1:
        lo = [m - (s.min if s else m) for m, s in zip(med, stats, strict=True)]
        hi = [(s.max if s else m) - m for m, s in zip(med, stats, strict=True)]
        bars = ax1.bar(xs, med, yerr=[lo, hi], capsize=4, color="tab:blue", label="total time (median, min..max)")
    else:
        bars = ax1.bar(xs, med, color="tab:blue", label="total time")
    ax1.bar_label(bars, labels=[f"{v:,.0f} ms" for v in med], label_type="center", color="white")
    limits = [r.limit_ms for r in base]
    if any(v is not None for v in limits):
        ax1.scatter(xs, [v if v is not None else float("nan") for v in limits], color="tab:red",
                    marker="_", s=400, linewidths=2, label=f"{bench.cores}-core compute limit", zorder=3)  # fmt: skip
    ax1.set_xticks(xs, labels)
    ax1.set_xlabel("method")
    ax1.set_ylabel("total time (ms)")
    ax1.set_title("Total time")
    ax1.legend(fontsize="small")
    ax2.bar([x - 0.2 for x in xs], [r.value("send-cpu") or 0.0 for r in base], width=0.4, label="source (send)")
    ax2.bar([x + 0.2 for x in xs], [r.value("recv-cpu") or 0.0 for r in base], width=0.4, label="destination (recv)")
    ax2.set_xticks(xs, labels)
    ax2.set_xlabel("method")
    ax2.set_ylabel("CPU % of the migration's wall time (100 = one core)")
    ax2.set_title("CPU per side")
    ax2.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, outdir, "time-cpu.png")


def _pps_sweep(bench: Bench, rows: list[Row], outdir: str) -> str:
    """Pages/s against the cap, one line per method (an uncapped run right of the largest cap)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    capped = sorted({r.bandwidth for r in rows if r.bandwidth > 0})
    uncapped = any(r.bandwidth == 0 for r in rows)
    x_unc = (capped[-1] * 2 if capped else 1.25e9) * 8 / 1e9
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        pps = r.value("pages-per-second")
        if pps is not None:
            series.setdefault(_label(r), []).append((r.bandwidth * 8 / 1e9 if r.bandwidth > 0 else x_unc, pps))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ticks = [c * 8 / 1e9 for c in capped] + ([x_unc] if uncapped else [])
    ax.set_xticks(ticks, [bandwidth_label(c) for c in capped] + (["uncapped"] if uncapped else []))
    ax.minorticks_off()
    ax.set_xlabel("max-bandwidth (link cap)")
    ax.set_ylabel("pages per second")
    ax.set_title(f"Pages per second vs link cap, {bench.config.channels} channels")
    ax.legend(fontsize="small")
    return _save(fig, outdir, "pps-vs-bandwidth.png")


def _pps_bars(bench: Bench, rows: list[Row], outdir: str) -> str:
    """One bandwidth: pages/s per method as bars, the cap in the title."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(rows)))
    pps = [r.value("pages-per-second") or 0.0 for r in rows]
    bars = ax.bar(xs, pps, color="tab:purple")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in pps], fontsize="small")
    ax.set_xticks(xs, [_label(r) for r in rows])
    ax.set_xlabel("method")
    ax.set_ylabel("pages per second")
    bw = bandwidth_label(rows[0].bandwidth)
    ax.set_title(
        f"Pages per second at max-bandwidth {bw}, {bench.config.channels} channels\n"
        "(one bandwidth measured; --bandwidth 1Gbps,10Gbps,0 sweeps the cap)",
        fontsize="medium",
    )
    return _save(fig, outdir, "pps-vs-bandwidth.png")


def _wire(bench: Bench, base: list[Row], title: str, outdir: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(base)))
    vals = []
    for r in base:
        v = r.value("socket-bytes")
        vals.append((v if v is not None else r.value("wire-bytes") or 0.0) / MIB)
    bars = ax.bar(xs, vals, color="tab:green")
    ax.bar_label(bars, labels=[f"{v:,.1f} MiB" for v in vals], label_type="center", color="white")
    ram = bench.config.memory / MIB
    ax.axhline(ram, color="tab:red", linestyle="--")
    ax.annotate(f"guest RAM ({ram:,.0f} MiB)", (0, ram), xycoords=("axes fraction", "data"),
                xytext=(4, 3), textcoords="offset points", color="tab:red")  # fmt: skip
    ax.set_ylim(0, max([ram, *vals]) * 1.15)
    ax.set_xticks(xs, [_label(r) for r in base])
    ax.set_xlabel("method")
    ax.set_ylabel("MiB sent on the sockets")
    ax.set_title(f"Bytes sent ({title})", fontsize="medium")
    return _save(fig, outdir, "wire-bytes.png")


def write_plots(bench: Bench, outdir: str) -> list[str]:
    """Write the plots into ``outdir`` (created) and return their paths (none when no run succeeded)."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(outdir, exist_ok=True)
    rows = [r for r in bench.rows() if not r.note]
    if not rows:
        return []
    c = bench.config
    first_bw = next(bw for bw in c.bandwidths if any(r.bandwidth == bw for r in rows))
    base = [r for r in rows if r.bandwidth == first_bw]
    title = f"{c.channels} channels, {bandwidth_label(first_bw)}, {c.memory // MIB} MiB guest"
    written = [_time_cpu(bench, base, title, outdir)]
    if len({r.bandwidth for r in rows}) > 1:
        written.append(_pps_sweep(bench, rows, outdir))
    else:
        written.append(_pps_bars(bench, rows, outdir))
    written.append(_wire(bench, base, title, outdir))
    return written
