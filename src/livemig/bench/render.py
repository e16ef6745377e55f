"""The bench's tables, as text and markdown, from aggregated rows. Pure.

The text layout is that of the table in QEMU's docs/devel/migration/qatzip-compression.rst
(``|8 Channels |Total time(ms)|down time(ms)|throughput(mbps)|pages per second|send cpu %|recv cpu %|``),
two header lines, a rule after every row. Four columns
are added on the right: the compute limit (see :mod:`livemig.bench.limits`), the percent of it the
run reached, the bytes really sent, and the pages sent per RAM page (1.00x when none went twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..units import format_rate_bits, format_size, plural
from .convergence import render_convergence
from .model import TLS_SUFFIX, Row, aggregate, label_parts, ratio_row
from .tables import grid

if TYPE_CHECKING:
    from .config import BenchConfig
    from .results import Bench


@dataclass(frozen=True)
class Column:
    key: str  # metric name, or "limit" / "of-limit"
    top: str
    bottom: str
    fmt: Callable[[float], str]


def _int(v: float) -> str:
    return f"{v:.0f}"


def _mib(v: float) -> str:
    return f"{v / (1 << 20):.1f}"


def _times(v: float) -> str:
    return f"{v:.2f}x"


def _pct(v: float) -> str:
    return f"{v:.0f}%"


def columns(cores: int) -> list[Column]:
    """The table's value columns, in order (the document's six, then limit, % of limit, wire)."""
    return [
        Column("total-time", "Total", "time(ms)", _int),
        Column("downtime", "down", "time(ms)", _int),
        Column("mbps", "throughput", "(mbps)", _int),
        Column("pages-per-second", "pages per", "second", _int),
        Column("send-cpu", " send", " cpu %", _int),
        Column("recv-cpu", " recv", " cpu%", _int),
        Column("limit", f"{cores}-core", "limit(ms)", _int),
        Column("of-limit", "% of", "limit", _pct),
        Column("wire", "sent", "(MiB)", _mib),
        Column("pages-sent-per-ram-page", "pages", "/RAM", _times),
    ]


def _cell(row: Row, col: Column, spread: bool) -> str:
    if col.key == "limit":
        return col.fmt(row.limit_ms) if row.limit_ms is not None else "-"
    if col.key == "of-limit":
        v = row.of_limit
        return col.fmt(v) if v is not None else "-"
    key = col.key
    if key == "wire":
        # bytes really written to the sockets when the bench measured them, else the engine's count
        key = "socket-bytes" if "socket-bytes" in row.stats else "wire-bytes"
    s = row.stats.get(key)
    if s is None:
        return "-"
    if spread:
        return f"{col.fmt(s.min)}..{col.fmt(s.max)}"
    return col.fmt(s.median)


def _label(row: Row, with_peer: bool) -> str:
    method = f"{row.method}: {row.picked}" if row.picked else row.method
    if not with_peer:
        return method
    return f"{method} {'QEMU' if row.peer == 'qemu' else 'livemig'}"


def _ratio_cells(ours: Row, theirs: Row, cols: Sequence[Column]) -> list[str]:
    keys = [c.key if c.key != "wire" else "socket-bytes" for c in cols]
    r = ratio_row(
        ours, theirs, [k for k in keys if k not in ("limit", "of-limit", "pages-sent-per-ram-page")]
    )
    out = []
    for k in keys:
        v = r.get(k)
        out.append(f"{v:.2f}x" if v is not None else "-")
    return out


def table_lines(rows: Sequence[Row], cores: int, spread: bool = False) -> list[list[str]]:
    """The table as a list of cell lists: [label, value cells...] or [label, note].

    With ``spread`` the cells are "min..max" instead of medians. Rows of peer "qemu" follow the
    livemig row of the same method and are followed by a "livemig/QEMU" ratio row; a METHOD+tls
    row (``bench --tls``) is followed by a "tls/plain" ratio row.
    """
    cols = columns(cores)
    with_peer = any(r.peer == "qemu" for r in rows)
    out: list[list[str]] = []
    for row in rows:
        label = _label(row, with_peer)
        if row.note:
            out.append([label, row.note])
        else:
            cells = [label] + [_cell(row, c, spread) for c in cols]
            out.append(cells)
        if row.method.endswith(TLS_SUFFIX) and not spread:
            plain = next((r for r in rows if (r.peer, r.method, r.channels, r.bandwidth)
                          == (row.peer, row.method.removesuffix(TLS_SUFFIX), row.channels, row.bandwidth)), None)
            if plain is not None and not plain.note and not row.note:
                out.append(["tls/plain", *_ratio_cells(row, plain, cols)])
        if row.peer == "qemu" and not spread:
            ours = next(
                (
                    r
                    for r in rows
                    if r.peer == "livemig"
                    and (r.method, r.channels, r.bandwidth) == (row.method, row.channels, row.bandwidth)
                ),
                None,
            )
            if ours is not None and not ours.note and not row.note:
                out.append(["livemig/QEMU", *_ratio_cells(ours, row, cols)])
    return out


def render_text(rows: Sequence[Row], cores: int, channels_label: str, spread: bool = False) -> str:
    """The document's ASCII table (one per bandwidth/channel group; the caller splits groups)."""
    cols = columns(cores)
    body = table_lines(rows, cores, spread)
    first = max([len(channels_label) + 1, *(len(b[0]) for b in body)])
    widths = []
    for i, c in enumerate(cols):
        w = max(len(c.top), len(c.bottom))
        for b in body:
            if len(b) == len(cols) + 1:
                w = max(w, len(b[i + 1]))
        widths.append(w)
    rule = "|" + "-" * first + "|" + "|".join("-" * w for w in widths) + "|"
    inner = sum(widths) + len(widths) - 1
    lines = [
        rule,
        "|"
        + channels_label.ljust(first)
        + "|"
        + "|".join(c.top.ljust(w) for c, w in zip(cols, widths, strict=False))
        + "|",
        "|"
        + " " * first
        + "|"
        + "|".join(c.bottom.ljust(w) for c, w in zip(cols, widths, strict=False))
        + "|",
        rule,
    ]
    for b in body:
        if len(b) == 2:
            lines.append("|" + b[0].ljust(first) + "|" + b[1][:inner].ljust(inner) + "|")
            if len(b[1]) > inner:
                lines.append("|" + " " * first + "|" + b[1][inner : 2 * inner].ljust(inner) + "|")
        else:
            lines.append(
                "|"
                + b[0].ljust(first)
                + "|"
                + "|".join(v.rjust(w) for v, w in zip(b[1:], widths, strict=False))
                + "|"
            )
        lines.append(rule)
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row], cores: int, channels_label: str, spread: bool = False) -> str:
    """The same table as GitHub markdown."""
    cols = columns(cores)
    body = table_lines(rows, cores, spread)
    head = (
        "| " + channels_label + " | " + " | ".join(f"{c.top.strip()} {c.bottom.strip()}" for c in cols) + " |"
    )
    sep = "|---|" + "|".join("---:" for _ in cols) + "|"
    lines = [head, sep]
    for b in body:
        if len(b) == 2:
            lines.append(f"| {b[0]} | {b[1]} |" + " |" * (len(cols) - 1))
        else:
            lines.append("| " + " | ".join(b) + " |")
    return "\n".join(lines)


def condition_label(c: BenchConfig, bw: int) -> str:
    """What limits a table's rows: ``cap 10Gbps`` (max-bandwidth), ``link 10Gbps`` (tc tbf, limiters
    off) or ``uncapped``, with the guest size in a size sweep."""
    size = f"{format_size(c.memory)}, " if len(c.memories) > 1 else ""
    if c.link_rate:
        return f"{size}link {bandwidth_label(c.link_rate)} (tc tbf, max-bandwidth off)"
    return f"{size}{'cap ' if bw > 0 else ''}{bandwidth_label(bw)}"


def render_sweep(benches: Sequence[Bench]) -> str:
    """A sweep's summary: per row, total time and time per GiB of RAM under each section's conditions
    (guest size, cap or link), medians."""
    cols: list[str] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for b in benches:
        for row in b.rows():
            if row.note:
                continue
            col = condition_label(b.config, row.bandwidth) if len(b.config.memories) > 1 else \
                f"{format_size(b.config.memory)}, {condition_label(b.config, row.bandwidth)}"
            if col not in cols:
                cols.append(col)
            total = row.value("total-time")
            if total is not None:
                per_gib = total / (b.config.memory / (1 << 30))
                cells.setdefault((row.method, row.peer), {})[col] = f"{total:.0f} ({per_gib:.0f}/GiB)"
    lines = ["Sweep: total time ms (ms per GiB of guest RAM), medians"]
    width = max([10, *(len(f"{m} {p}") for m, p in cells)])
    lines.append(" | ".join([f"{'method':{width}}", *cols]))
    for (m, p), byc in cells.items():
        lines.append(" | ".join([f"{m + (' QEMU' if p == 'qemu' else ''):{width}}",
                                 *(f"{byc.get(c, '-'):>{len(c)}}" for c in cols)]))
    return "\n".join(lines)


def bandwidth_label(bw: int) -> str:
    """``10Gbps`` style label of a cap in bytes/s (``uncapped`` for 0)."""
    if bw <= 0:
        return "uncapped"
    text = format_rate_bits(bw)  # e.g. "10.00 Gbps"
    num, unit = text.split()
    return f"{float(num):g}{unit}"


def render_memory(rows: Sequence[Row], markdown: bool = False) -> str:
    """Memory used by migration beyond guest RAM, the document's QAT table layout.

    One line per channel count, a sender and a receiver column per method (MiB, medians).
    """
    methods: list[str] = []
    chans: list[int] = []
    for r in rows:
        if r.method not in methods:
            methods.append(r.method)
        if r.channels not in chans:
            chans.append(r.channels)
    chans.sort()
    header = ["Number of channels"]
    for m in methods:
        header += [f"{m} sender", f"{m} receiver"]
    body: list[list[str]] = []
    for ch in chans:
        line = [str(ch)]
        for m in methods:
            row = next((r for r in rows if r.method == m and r.channels == ch), None)
            for key in ("send-mem", "recv-mem"):
                if row is None:
                    line.append("-")
                elif row.note:
                    line.append(row.note.split(":")[0])  # "n/a" or "error"
                else:
                    v = row.value(key)
                    line.append(f"{v / (1 << 20):.1f}M" if v is not None else "-")
        body.append(line)
    notes = [f"{r.method} at {r.channels} channels: {r.note}" for r in rows if r.note]
    return "\n".join(grid(header, body, markdown) + notes)


def header(b: Bench) -> str:
    """The lines above the tables: host, guest, data, link, and where each method runs."""
    h, c, d = b.host, b.config, b.data
    load = (
        f"; load average {h['loadavg-before']:.1f} before, {h['loadavg-after']:.1f} after"
        if "loadavg-after" in h
        else ""
    )
    data = ""
    if d is not None:
        data = (
            f", zstd-1 ratio {d.zstd1_ratio:.2f} ({format_size(d.size)} sample,"
            f" {100 * d.zero_fraction:.1f}% zero pages)"
        )
    lines = [
        f"Host: {h['cores']} cores, {h['cpu-model']}, Linux {h['kernel']}{load}",
        f"VM Configuration: {c.guest} guest, {plural(c.smp, 'vCPU')}, {format_size(c.memory)} memory",
        f"VM Workload: vCPUs {c.workload}{_workload_detail(c)}; memory filled with {c.fill_label}{data}",
        f"Link: {plural(c.channels, 'multifd channel')} over loopback, "
        + (f"shaped to {bandwidth_label(c.link_rate)} with tc tbf, max-bandwidth off on both engines"
           if c.link_rate else "max-bandwidth " + ", ".join(bandwidth_label(x) for x in c.bandwidths)),
    ]
    where = []
    done = [r for r in aggregate(b.runs) if r.peer == "livemig" and not r.note]
    for m in c.methods:
        row = next((r for r in done if label_parts(r.method)[0] == m), None)  # any of its rows
        if row is not None:
            kind = "accelerator" if row.accelerated else "CPU"
            where.append(f"{m}: {kind} ({row.backend})" if row.backend else f"{m}: {kind}")
        else:
            reason = c.method_na(m)
            where.append(f"{m}: n/a ({reason})" if reason else f"{m}: no successful run")
    lines.append("Methods: " + "; ".join(where))
    if b.peer_info:
        p = b.peer_info
        if p.get("unavailable"):
            lines.append(f"Peer: QEMU n/a: {p['unavailable']}")
        else:
            lines.append(f"Peer: {p['version']}, accel={p['accel']}; guest: {p['guest']}")
    return "\n".join(lines)


def _workload_detail(c: BenchConfig) -> str:
    """`` at 100000 pages/s over 131072 pages`` for the options given, else ``""``."""
    out = ""
    if c.workload != "idle" and c.dirty_rate is not None:
        out += f" at {c.dirty_rate} pages/s"
    if c.workload != "idle" and c.working_set:
        out += f" over {c.working_set} pages"
    return out


def throttle_lines(b: Bench) -> list[str]:
    """Per auto-converge run: the vCPU throttle it reached and how long it held each vCPU."""
    out = []
    for r in b.runs:
        ac = (r.result or {}).get("livemig", {}).get("auto-converge")
        if r.peer == "livemig" and ac is not None:
            out.append(f"auto-converge, {r.method} {bandwidth_label(r.bandwidth)} run {r.repeat + 1}: cpu throttle "
                       f"reached {ac['cpu-throttle-peak']} %, held each vCPU {ac['cpu-throttle-held-s']:.1f} s")
    return out


def footer(b: Bench) -> str:
    """The lines below the tables: what the limit and sent columns mean, the measured speeds."""
    cores = b.cores
    lines = [
        f"{cores}-core limit = max(RAM/compress + RAM/decompress + wire/loopback, wire/cap), each speed"
        f" measured with {cores} threads at once (all cores busy) on the data sample (livemig.bench.limits);"
        " an auto row's limit is its picked method's; sent = TCP payload bytes on the namespace's loopback"
        " (else the engine's wire-bytes)."
    ]
    if b.loopback:
        lines.append(
            f"loopback TCP: {b.loopback.wall_bps / 1e6:.0f} MB/s on one connection,"
            f" {b.loopback.all_bps / 1e6:.0f} MB/s on {b.loopback.connections} at once,"
            f" {b.loopback.core_seconds_per_byte * 1e9:.3f} core-ns/byte (send+recv)"
        )
    for m, cs in b.codecs.items():
        if m == "none":
            continue
        lines.append(
            f"{f'auto candidate {m}' if m != cs.method else f'{m}-{cs.level}'}: compress"
            f" {cs.compress_bps / 1e6:.0f} MB/s on one thread,"
            f" {cs.compress_all_bps / 1e6:.0f} MB/s on {cs.threads} at once; decompress"
            f" {cs.decompress_bps / 1e6:.0f} / {cs.decompress_all_bps / 1e6:.0f} MB/s; ratio {cs.ratio:.2f}"
        )
    for m, e in b.codec_errors.items():
        lines.append(f"{m}: codec not measured: {e}")
    lines += throttle_lines(b)
    if b.peer_info and not b.peer_info.get("unavailable"):
        lines.append(
            "QEMU rows: CPU % from /proc/<pid>/stat over QEMU's total time; QEMU 7.2's throughput and"
            " max-bandwidth count multifd pages uncompressed, so compare the sent column for bytes."
        )
    return "\n".join(lines)


def render_bench(b: Bench, markdown: bool) -> str:
    """Header, one table per bandwidth (and a min..max table when repeated), memory table, footer."""
    rows = b.rows()
    c = b.config
    render = render_markdown if markdown else render_text
    out = [header(b), ""]
    for bw in c.bandwidths:
        group = [r for r in rows if r.bandwidth == bw]
        label = plural(c.channels, "Channel")
        title = condition_label(c, bw)
        out.append(f"{title}, medians of {c.repeat} runs:" if c.repeat > 1 else f"{title}:")
        out.append(render(group, b.cores, label))
        if c.repeat > 1:
            out.append(f"{title}, min..max of {c.repeat} runs:")
            out.append(render(group, b.cores, label, spread=True))
        out += [f"  {r.method} ({r.peer}) {e}" for r in group for e in r.errors]
        if c.convergence != ("precopy",):
            out.append(f"{title}, how each row finished:")
            out.append(render_convergence(group, markdown))
        out.append("")
    if b.memory_runs:
        out.append("Memory used by migration beyond guest RAM (sender / receiver, medians):")
        out.append(render_memory(aggregate(b.memory_runs), markdown))
        out.append("")
    out.append(footer(b))
    return "\n".join(out)
