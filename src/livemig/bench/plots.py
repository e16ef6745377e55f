"""PNG plots of a bench (matplotlib, Agg backend: no display needed).

* ``time-cpu.png``: median total time per method (bars, with min..max whiskers) and send/recv CPU %.
* ``pps-vs-bandwidth.png``: pages per second against the link cap, one line per method (and QEMU).
* ``wire-bytes.png``: bytes really sent per method (socket payload, else the engine's wire-bytes).

One set is written per bench; with several bandwidths, the time/CPU and wire plots use the first.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .model import Row
from .render import bandwidth_label

if TYPE_CHECKING:
    from .cli import Bench


def _label(row: Row) -> str:
    return row.method if row.peer == "livemig" else f"{row.method} (QEMU)"


def write_plots(bench: Bench, outdir: str) -> list[str]:
    """Write the plots into ``outdir`` (created) and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    rows = [r for r in bench.rows() if not r.note]
    written: list[str] = []
    if not rows:
        return written
    first_bw = bench.config["bandwidths"][0]
    base = [r for r in rows if r.bandwidth == first_bw]
    cfg = bench.config
    title = f"{cfg['channels']} channels, {bandwidth_label(first_bw)}, {cfg['memory'] >> 20} MiB"

    # total time and CPU per method
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [_label(r) for r in base]
    med = [r.value("total-time") or 0.0 for r in base]
    lo = [
        m - (r.stats["total-time"].min if "total-time" in r.stats else m)
        for m, r in zip(med, base, strict=False)
    ]
    hi = [
        (r.stats["total-time"].max if "total-time" in r.stats else m) - m
        for m, r in zip(med, base, strict=False)
    ]
    ax1.bar(labels, med, yerr=[lo, hi], capsize=4, color="tab:blue")
    limits = [r.limit_ms for r in base]
    if any(v is not None for v in limits):
        ax1.scatter(labels, [v if v is not None else float("nan") for v in limits], color="tab:red",
                    marker="_", s=400, label="compute limit", zorder=3)  # fmt: skip
        ax1.legend()
    ax1.set_ylabel("total time (ms)")
    ax1.set_title("Total time")
    xs = range(len(base))
    ax2.bar([x - 0.2 for x in xs], [r.value("send-cpu") or 0.0 for r in base], width=0.4, label="send")
    ax2.bar([x + 0.2 for x in xs], [r.value("recv-cpu") or 0.0 for r in base], width=0.4, label="recv")
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("CPU % (100 = one core)")
    ax2.set_title("CPU")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(outdir, "time-cpu.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # pages per second against bandwidth (an uncapped run is drawn right of the largest cap)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    capped = sorted({r.bandwidth for r in rows if r.bandwidth > 0})
    x_unc = (capped[-1] * 2 if capped else 1.25e9) * 8 / 1e9
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        pps = r.value("pages-per-second")
        if pps is None:
            continue
        x = r.bandwidth * 8 / 1e9 if r.bandwidth > 0 else x_unc
        series.setdefault(_label(r), []).append((x, pps))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if len(capped) > 1 or (capped and any(r.bandwidth == 0 for r in rows)):
        ax.set_xscale("log")
    ticks = [c * 8 / 1e9 for c in capped]
    labels_x = [bandwidth_label(c) for c in capped]
    if any(r.bandwidth == 0 for r in rows):
        ticks.append(x_unc)
        labels_x.append("uncapped")
    ax.set_xticks(ticks, labels_x)
    ax.minorticks_off()
    ax.set_xlabel("max-bandwidth")
    ax.set_ylabel("pages per second")
    ax.set_title(f"Pages per second vs link cap, {bench.config['channels']} channels")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(outdir, "pps-vs-bandwidth.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    # wire bytes
    fig, ax = plt.subplots(figsize=(7, 4.5))
    vals = []
    for r in base:
        v = r.value("socket-bytes")
        if v is None:
            v = r.value("wire-bytes")
        vals.append((v or 0.0) / (1 << 20))
    ax.bar(labels, vals, color="tab:green")
    ax.set_ylabel("MiB sent")
    ax.set_title(f"Bytes sent on the sockets ({title})")
    fig.tight_layout()
    path = os.path.join(outdir, "wire-bytes.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
