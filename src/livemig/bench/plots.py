"""PNG plots of a bench (matplotlib, Agg backend: no display needed).

* ``time-cpu.png``: median total time per method (bars with min..max whiskers, the compute limit
  as a red mark) and each side's CPU % per method.
* ``pps-vs-bandwidth.png``: pages per second against the link cap, one line per method (and
  QEMU); with a single bandwidth, a bar per method with the cap in the title (a sweep such as
  ``--bandwidth 1Gbps,10Gbps,0`` draws the lines).
* ``wire-bytes.png``: bytes really sent per method (socket payload, else the engine's wire-bytes),
  with the guest's RAM size as a line.

With several bandwidths (a sweep), time-cpu.png has one row of panels per bandwidth and
wire-bytes.png a bar per bandwidth beside each other for every method.
"""

from __future__ import annotations

import os
from typing import Any

from ..units import plural
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


def _time_cpu_row(bench: Bench, base: list[Row], axes: Any, bw: int) -> None:
    """One bandwidth's panels: total time per method (with its compute limit, labelled) and CPU per side."""
    ax1, ax2 = axes
    labels = [_label(r) for r in base]
    xs = list(range(len(base)))
    med = [r.value("total-time") or 0.0 for r in base]
    stats = [r.stats.get("total-time") for r in base]
    if bench.config.repeat > 1:
        lo = [m - (s.min if s else m) for m, s in zip(med, stats, strict=True)]
        hi = [(s.max if s else m) - m for m, s in zip(med, stats, strict=True)]
        bars = ax1.bar(xs, med, width=0.5, yerr=[lo, hi], capsize=4, color="tab:blue",
                       label="total time (median, min..max)")
    else:
        bars = ax1.bar(xs, med, width=0.5, color="tab:blue", label="total time")
    ax1.bar_label(bars, labels=[f"{v:,.0f} ms" for v in med], label_type="center", color="white")
    limits = [r.limit_ms for r in base]
    if any(v is not None for v in limits):
        ax1.scatter(xs, [v if v is not None else float("nan") for v in limits], color="tab:red",
                    marker="_", s=900, linewidths=2, label=f"{bench.cores}-core compute limit", zorder=3)  # fmt: skip
        for x, v in zip(xs, limits, strict=True):
            if v is not None:  # the limit's value right of its tick, outside the bar
                ax1.annotate(f"{v:,.0f} ms", (x + 0.3, v), va="center", fontsize="small", color="tab:red")
    ax1.set_xticks(xs, labels)
    ax1.set_xlim(-0.6, len(xs) - 0.1)
    tops = [*med, *((s.max if s else 0.0) for s in stats), *(v for v in limits if v is not None)]
    ax1.set_ylim(0, max([1.0, *tops]) * 1.3)  # room for the legend above the bars
    ax1.set_xlabel("method")
    ax1.set_ylabel("total time (ms)")
    ax1.set_title(f"Total time, {bandwidth_label(bw)}")
    ax1.legend(fontsize="small", markerscale=0.5)
    ax2.bar([x - 0.2 for x in xs], [r.value("send-cpu") or 0.0 for r in base], width=0.4, label="source (send)")
    ax2.bar([x + 0.2 for x in xs], [r.value("recv-cpu") or 0.0 for r in base], width=0.4, label="destination (recv)")
    ax2.set_xticks(xs, labels)
    ax2.set_xlabel("method")
    ax2.set_ylabel("CPU % of wall time (100 = one core)")
    ax2.set_title(f"CPU per side, {bandwidth_label(bw)}")
    ax2.legend(fontsize="small")


def _time_cpu(bench: Bench, groups: dict[int, list[Row]], title: str, outdir: str) -> str:
    """Total time and CPU per side: one row of two panels per bandwidth, in --bandwidth's order."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.5 * len(groups)), squeeze=False)
    for row_axes, (bw, base) in zip(axes, groups.items(), strict=True):
        _time_cpu_row(bench, base, row_axes, bw)
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
    ax.set_title(f"Pages per second vs link cap, {plural(bench.config.channels, 'channel')}")
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
        f"Pages per second at max-bandwidth {bw}, {plural(bench.config.channels, 'channel')}\n"
        "(one bandwidth measured; --bandwidth 1Gbps,10Gbps,0 sweeps the cap)",
        fontsize="medium",
    )
    return _save(fig, outdir, "pps-vs-bandwidth.png")


def _wire(bench: Bench, groups: dict[int, list[Row]], title: str, outdir: str) -> str:
    """Bytes sent per method: a bar per bandwidth side by side; the guest's RAM as a line in the legend."""
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(_label(r) for rows in groups.values() for r in rows))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(methods) * len(groups)), 4.5))
    top = 0.0
    for i, (bw, rows) in enumerate(groups.items()):
        sent = {_label(r): _sent(r) / MIB for r in rows}
        xs = [m + (i - (len(groups) - 1) / 2) * width for m, name in enumerate(methods) if name in sent]
        vals = [sent[name] for name in methods if name in sent]
        bars = ax.bar(xs, vals, width=width * 0.95, label=f"max-bandwidth {bandwidth_label(bw)}")
        ax.bar_label(bars, labels=[f"{v:,.1f} MiB" for v in vals], label_type="center", color="white",
                     fontsize="small")
        top = max([top, *vals])
    ram = bench.config.memory / MIB
    ax.axhline(ram, color="tab:red", linestyle="--", label=f"guest RAM ({ram:,.0f} MiB)")
    ax.set_ylim(0, max(ram, top) * 1.3)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("method")
    ax.set_ylabel("MiB sent on the sockets")
    ax.set_title(f"Bytes sent ({title})", fontsize="medium")
    ax.legend(fontsize="small", loc="upper right")
    return _save(fig, outdir, "wire-bytes.png")


def _sent(r: Row) -> float:
    """Bytes a run sent: the socket payload, else the engine's wire-bytes."""
    v = r.value("socket-bytes")
    return v if v is not None else r.value("wire-bytes") or 0.0


def write_plots(bench: Bench, outdir: str) -> list[str]:
    """Write the plots into ``outdir`` and return their paths (none when no run succeeded).

    ``outdir`` is created if missing, not its parents (``livemig bench`` checked that they exist).
    """
    import matplotlib

    matplotlib.use("Agg")
    if not os.path.isdir(outdir):
        os.mkdir(outdir)
    rows = [r for r in bench.rows() if not r.note]
    if not rows:
        return []
    c = bench.config
    groups = {bw: [r for r in rows if r.bandwidth == bw] for bw in c.bandwidths}
    groups = {bw: g for bw, g in groups.items() if g}
    caps = ", ".join(bandwidth_label(bw) for bw in groups)
    title = f"{plural(c.channels, 'channel')}, {caps}, {c.memory // MIB} MiB guest"
    written = [_time_cpu(bench, groups, title, outdir)]
    if len(groups) > 1:
        written.append(_pps_sweep(bench, rows, outdir))
    else:
        written.append(_pps_bars(bench, rows, outdir))
    written.append(_wire(bench, groups, title, outdir))
    return written
