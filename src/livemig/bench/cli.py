"""``livemig bench``: the seed's table (qatzip-compression.rst) measured on this host.

For each bandwidth, repeat and method it runs one real migration (``livemig migrate --local``:
separate source and destination processes over loopback), optionally the same with QEMU
(``--peer qemu``), then prints one table per bandwidth with medians (and min..max when repeated),
the memory table (``--memory-table``), writes every statistic of every run (``--json``) and plots
(``--plot``).

Examples::

    livemig bench                                   # qatzip, zstd, none; 8 channels; 10Gbps; 2G; idle
    livemig bench --memory 2G --peer qemu           # the same with QEMU's migration side by side
    livemig bench --memory-table                    # + memory used at 2, 4 and 8 channels
    livemig bench --bandwidth 1Gbps,10Gbps,0 --plot plots/   # sweep the cap (0 = uncapped)
    livemig bench --corpus /work/shared/corpus/silesia --repeat 3 --markdown --json bench.json

Columns: the seed's six (total time, downtime, throughput and pages per second as the engine's
query-migrate result reports them; send/recv CPU % = each side's process CPU time over the
migration's wall time, 100 = one core), then:

* ``N-core limit(ms)``: max((RAM/compress + RAM/decompress + wire x loopback) / N cores, wire/cap),
  from single-core codec speeds and loopback socket cost measured in-process on a sample of the same
  data (see :mod:`livemig.bench.limits`); ``% of limit`` = limit / total time.
* ``sent (MiB)``: TCP payload bytes that really crossed the sockets, counted on the ``lo`` of a
  private network namespace the migrations run in (``--no-netns``: the engine's wire-bytes).

A method, guest or peer that cannot run here gets an "n/a: <reason>" row and the rest runs; a
failed run shows its error and does not stop the others; Ctrl-C or SIGTERM stops every child
process (each in its own session, descendants found through /proc) and removes the /dev/shm file
of the QEMU peer. Exit status: 0 when every attempted run succeeded, 1 if one failed, 2 on bad
options, 130 on Ctrl-C. Figures are only as good as the host is quiet: the header shows the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from ..compress import available_methods, method_names
from ..errors import MigrationError
from ..units import format_size, parse_rate, parse_size
from .data import host_info, sample_data, zero_page_fraction, zstd1_ratio
from .limits import CodecSpeed, LoopbackSpeed, compute_limit, measure_codec, measure_loopback
from .model import BenchError, Row, Run, aggregate
from .procs import Children, NetNamespace
from .render import bandwidth_label, render_markdown, render_memory, render_text
from .runner import Experiment, run_livemig

DEFAULT_METHODS = "qatzip,zstd,none"
DEFAULT_MEMORY = "2G"
MEMORY_TABLE_CHANNELS = (2, 4, 8)


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``livemig bench``."""
    p = subparsers.add_parser(
        "bench",
        help="measure the seed's table (time, downtime, throughput, pages/s, CPU) per compression method",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default {DEFAULT_METHODS})")
    p.add_argument("--memory", default=DEFAULT_MEMORY, help=f"guest RAM (default {DEFAULT_MEMORY})")
    p.add_argument("--multifd-channels", type=int, default=8, help="multifd channels (default 8)")
    p.add_argument("--bandwidth", default="10Gbps", help="max-bandwidth; a comma list sweeps (0 = uncapped)")
    p.add_argument("--corpus", metavar="DIR", help="fill RAM with the files of DIR (e.g. Silesia)")
    p.add_argument("--fill", default="corpus", help="RAM fill when no --corpus (default: built-in corpus)")
    p.add_argument("--guest", choices=["kvm", "portable"], help="guest kind (default: kvm where it works)")
    p.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--workload", default="idle", choices=["idle", "dirty", "counter"], help="vCPU workload")
    p.add_argument("--level", type=int, default=1, help="compression level for zlib/zstd/qatzip (default 1)")
    p.add_argument("--downtime-limit", type=int, help="downtime-limit in ms (default: the engine's, 300)")
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the table shows medians")
    p.add_argument("--peer", choices=["qemu"], help="also run QEMU's own migration (qemu-system-x86_64)")
    p.add_argument(
        "--memory-table", action="store_true", help="also measure memory needs at 2, 4, 8 channels"
    )
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", metavar="FILE", help="write every statistic of every run to FILE")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR")
    p.add_argument("--sample", default="32M", help="data sample for codec speeds and ratio (default 32M)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    p.add_argument("--no-netns", action="store_true", help="do not count socket bytes in a private netns")
    p.set_defaults(func=main)


@dataclass
class Bench:
    """Everything one bench invocation measured."""

    host: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    codecs: dict[str, CodecSpeed] = field(default_factory=dict)
    codec_errors: dict[str, str] = field(default_factory=dict)
    loopback: LoopbackSpeed | None = None
    runs: list[Run] = field(default_factory=list)
    memory_runs: list[Run] = field(default_factory=list)
    peer_info: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[Row]:
        rows = aggregate(self.runs)
        self.apply_limits(rows)
        return rows

    def apply_limits(self, rows: list[Row]) -> None:
        cores = int(self.host["cores"])
        for row in rows:
            codec = self.codecs.get(row.method)
            if codec is None or self.loopback is None:
                row.limit_note = self.codec_errors.get(row.method, "codec speed not measured")
                continue
            lim = compute_limit(int(self.config["memory"]), codec, self.loopback, row.bandwidth, cores)
            row.limit_ms = lim.ms

    def to_json(self) -> dict[str, Any]:
        rows = self.rows()
        return {
            "host": self.host,
            "config": self.config,
            "data": self.data,
            "codecs": {k: v.to_json() for k, v in self.codecs.items()},
            "codec-errors": self.codec_errors,
            "loopback": self.loopback.to_json() if self.loopback else None,
            "peer": self.peer_info,
            "rows": [r.to_json() for r in rows],
            "memory-rows": [r.to_json() for r in aggregate(self.memory_runs)],
            "runs": [r.to_json() for r in self.runs],
            "memory-runs": [r.to_json() for r in self.memory_runs],
        }


def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BenchError(f"--{what}: empty list")
    return items


def _parse_bandwidths(text: str) -> list[int]:
    out = []
    for t in _parse_list(text, "bandwidth"):
        out.append(0 if t.lower() in ("0", "unlimited", "uncapped", "none") else parse_rate(t))
    return out


def header(b: Bench) -> str:
    """The lines above the table: host, guest, data, link, and where each method runs."""
    h, c, d = b.host, b.config, b.data
    lines = [
        f"Host: {h['cores']} cores, {h['cpu-model']}, Linux {h['kernel']}"
        + (
            f"; load average {h['loadavg-before']:.1f} before, {h['loadavg-after']:.1f} after"
            if "loadavg-after" in h
            else ""
        ),
        f"VM Configuration: {c['guest']} guest, {c['smp']} vCPU, {format_size(c['memory'])} memory",
        f"VM Workload: vCPUs {c['workload']}; memory filled with {c['fill-label']}"
        + (f", zstd-1 ratio {d['zstd-1-ratio']:.2f}" if d.get("zstd-1-ratio") else "")
        + (
            f" ({format_size(d['sample-bytes'])} sample, {100 * d['zero-fraction']:.1f}% zero pages)"
            if d
            else ""
        ),
        f"Link: {c['channels']} multifd channels over loopback, max-bandwidth "
        + ", ".join(bandwidth_label(x) for x in c["bandwidths"]),
    ]
    where = []
    for m in c["methods"]:
        row = next(
            (r for r in aggregate(b.runs) if r.method == m and r.peer == "livemig" and not r.note), None
        )
        if row is not None:
            kind = "accelerator" if row.accelerated else "CPU"
            where.append(f"{m}: {kind} ({row.backend})" if row.backend else f"{m}: {kind}")
        else:
            reason = c["unavailable"].get(m)
            where.append(f"{m}: n/a ({reason})" if reason else f"{m}: no successful run")
    lines.append("Methods: " + "; ".join(where))
    if b.peer_info:
        p = b.peer_info
        if p.get("unavailable"):
            lines.append(f"Peer: QEMU n/a: {p['unavailable']}")
        else:
            lines.append(f"Peer: {p['version']}, accel={p['accel']}; guest: {p['guest']}")
    return "\n".join(lines)


def footer(b: Bench) -> str:
    cores = b.host["cores"]
    lines = [
        f"{cores}-core limit = max((RAM/compress + RAM/decompress + wire*loopback) / {cores} cores,"
        " wire/cap), from single-core codec speeds measured on the data sample (livemig.bench.limits);"
        " sent = TCP payload bytes on the namespace's loopback (else the engine's wire-bytes)."
    ]
    if b.loopback:
        lines.append(
            f"loopback TCP: {b.loopback.wall_bps / 1e6:.0f} MB/s,"
            f" {b.loopback.core_seconds_per_byte * 1e9:.3f} core-ns/byte (send+recv)"
        )
    for m, cs in b.codecs.items():
        if m == "none":
            continue
        lines.append(
            f"{m}-{cs.level}: compress {cs.compress_bps / 1e6:.0f} MB/s,"
            f" decompress {cs.decompress_bps / 1e6:.0f} MB/s per core, ratio {cs.ratio:.2f}"
        )
    for m, e in b.codec_errors.items():
        lines.append(f"{m}: codec not measured: {e}")
    if b.peer_info and not b.peer_info.get("unavailable"):
        lines.append(
            "QEMU rows: CPU % from /proc/<pid>/stat over QEMU's total time; QEMU 7.2's throughput and"
            " max-bandwidth count multifd pages uncompressed, so compare the sent column for bytes."
        )
    return "\n".join(lines)


def render_all(b: Bench, markdown: bool) -> str:
    """Header, one table per bandwidth (and a min..max table when repeated), memory table, footer."""
    rows = b.rows()
    cores = int(b.host["cores"])
    out = [header(b), ""]
    repeat = int(b.config["repeat"])
    for bw in b.config["bandwidths"]:
        group = [r for r in rows if r.bandwidth == bw]
        label = f"{b.config['channels']} Channels"
        title = (
            f"{bandwidth_label(bw)}, medians of {repeat} run(s):" if repeat > 1 else f"{bandwidth_label(bw)}:"
        )
        out.append(title)
        render = render_markdown if markdown else render_text
        out.append(render(group, cores, label))
        if repeat > 1:
            out.append(f"{bandwidth_label(bw)}, min..max of {repeat} runs:")
            out.append(render(group, cores, label, spread=True))
        for r in group:
            for e in r.errors:
                out.append(f"  {r.method} ({r.peer}) {e}")
        out.append("")
    if b.memory_runs:
        out.append("Memory used by migration beyond guest RAM (sender / receiver, medians):")
        out.append(render_memory(aggregate(b.memory_runs), markdown))
        out.append("")
    out.append(footer(b))
    return "\n".join(out)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _na_reason(method: str, unavailable: dict[str, str | None]) -> str | None:
    if method not in unavailable:
        return f"unknown method (known: {', '.join(method_names())})"
    return unavailable[method]


def _measure_data(b: Bench, args: argparse.Namespace) -> None:
    fill = b.config["fill"]
    size = parse_size(args.sample)
    size -= size % (128 * 4096)
    try:
        sample = sample_data(fill, max(size, 128 * 4096), memory=int(b.config["memory"]))
    except MigrationError as exc:
        b.data = {}
        b.codec_errors = {m: str(exc) for m in b.config["methods"]}
        _progress(f"bench: data sample unavailable: {exc}")
        return
    b.data = {"sample-bytes": len(sample), "zero-fraction": zero_page_fraction(sample)}
    level = int(b.config["level"])
    for m in b.config["methods"]:
        reason = b.config["unavailable"].get(m)
        if reason:
            b.codec_errors[m] = str(reason)
            continue
        try:
            b.codecs[m] = measure_codec(m, sample, level=level)
        except MigrationError as exc:
            b.codec_errors[m] = str(exc)
    b.data["zstd-1-ratio"] = zstd1_ratio(sample)
    b.loopback = measure_loopback()


def run_bench(args: argparse.Namespace, children: Children) -> Bench:
    """Measure everything ``args`` asks for. KeyboardInterrupt propagates (children stopped by caller)."""
    from ..guest import kvm_unavailable

    methods = _parse_list(args.methods, "methods")
    bandwidths = _parse_bandwidths(args.bandwidth)
    memory = parse_size(args.memory)
    if memory <= 0 or memory % 4096:
        raise BenchError(f"--memory: {args.memory} is not a positive multiple of 4 KiB")
    if not 1 <= args.multifd_channels <= 255:
        raise BenchError(f"--multifd-channels: {args.multifd_channels} is not between 1 and 255")
    if args.repeat < 1:
        raise BenchError(f"--repeat: {args.repeat} must be at least 1")
    if args.corpus:
        if not os.path.isdir(args.corpus):
            raise BenchError(f"--corpus: '{args.corpus}' is not a directory")
        fill = f"files:{os.path.abspath(args.corpus)}"
        fill_label = f"the files of {args.corpus}"
    else:
        fill = args.fill
        fill_label = "the built-in corpus" if fill == "corpus" else f"'{fill}' data"
    try:
        kvm_na = kvm_unavailable()
    except Exception as exc:  # an incomplete KVM module must not take the bench down
        kvm_na = f"KVM guest support is broken here: {exc!r}"
    guest = args.guest or ("kvm" if kvm_na is None else "portable")
    guest_na = kvm_na if guest == "kvm" else None
    unavailable = available_methods()
    config: dict[str, Any] = {
        "methods": methods,
        "bandwidths": bandwidths,
        "channels": args.multifd_channels,
        "memory": memory,
        "guest": guest,
        "smp": args.smp,
        "workload": args.workload,
        "fill": fill,
        "fill-label": fill_label,
        "level": args.level,
        "repeat": args.repeat,
        "peer": args.peer,
        "downtime-limit": args.downtime_limit,
        "unavailable": {m: _na_reason(m, unavailable) for m in methods},
    }
    b = Bench(host_info(), config)
    b.host["loadavg-before"] = os.getloadavg()[0]
    if b.host["loadavg-before"] > 0.5 * b.host["cores"]:
        _progress(
            f"bench: warning: load average {b.host['loadavg-before']:.1f} on {b.host['cores']} cores;"
            " other work will slow the runs and the codec measurements alike"
        )
    _progress("bench: measuring codec speeds on a data sample ...")
    _measure_data(b, args)
    exp = Experiment(
        guest, memory, args.workload, fill, args.smp, args.level, args.downtime_limit, args.timeout
    )
    workdir = tempfile.mkdtemp(prefix="livemig-bench-")
    netns: NetNamespace | None = None
    if not args.no_netns:
        try:
            netns = NetNamespace(children)
        except BenchError as exc:
            _progress(f"bench: socket bytes not counted: {exc}")
    peer = None
    if args.peer == "qemu":
        from .qemu_peer import QemuPeer

        peer = QemuPeer(children, exp, workdir, netns)
        b.peer_info = peer.describe()
    try:
        plan = [(bw, rep, m) for bw in bandwidths for rep in range(args.repeat) for m in methods]
        for i, (bw, rep, m) in enumerate(plan, 1):
            b.runs += _one(b, children, exp, m, args.multifd_channels, bw, rep, workdir, netns, guest_na,
                           f"{i}/{len(plan)}", peer)  # fmt: skip
        if args.memory_table:
            for ch in MEMORY_TABLE_CHANNELS:
                for m in methods:
                    key = ("livemig", m, ch, bandwidths[0])
                    reuse = [r for r in b.runs if (r.peer, r.method, r.channels, r.bandwidth) == key]
                    if reuse:
                        b.memory_runs += reuse
                        continue
                    b.memory_runs += _one(b, children, exp, m, ch, bandwidths[0], 0, workdir, netns, guest_na,
                                          f"memory {ch}ch", None)  # fmt: skip
    finally:
        if peer is not None:
            peer.close()
        if netns is not None:
            netns.close()
        shutil.rmtree(workdir, ignore_errors=True)
    b.host["loadavg-after"] = os.getloadavg()[0]
    return b


def _one(
    b: Bench,
    children: Children,
    exp: Experiment,
    method: str,
    channels: int,
    bw: int,
    rep: int,
    workdir: str,
    netns: NetNamespace | None,
    guest_na: str | None,
    tag: str,
    peer: Any,
) -> list[Run]:
    out: list[Run] = []
    reason = b.config["unavailable"].get(method)
    if reason is None and guest_na:
        reason = f"{exp.guest} guest: {guest_na}"
    if reason:
        out.append(Run("livemig", method, channels, bw, rep, na=reason))
    else:
        _progress(f"bench {tag}: livemig {method}, {channels} channels, {bandwidth_label(bw)} ...")
        t0 = time.monotonic()
        run = run_livemig(children, exp, method, channels, bw, rep, workdir, netns)
        _progress(f"bench {tag}: {'ok' if run.ok else run.error} ({time.monotonic() - t0:.1f} s)")
        out.append(run)
    if peer is not None:
        _progress(f"bench {tag}: QEMU {method}, {channels} channels, {bandwidth_label(bw)} ...")
        t0 = time.monotonic()
        prun: Run = peer.run(method, channels, bw, rep)
        _progress(
            f"bench {tag}: QEMU {'ok' if prun.ok else prun.na or prun.error} ({time.monotonic() - t0:.1f} s)"
        )
        out.append(prun)
    return out


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """Entry point of ``livemig bench``; returns the exit status (0 when every run succeeded)."""
    old = signal.signal(signal.SIGTERM, _sigterm)
    children = Children()
    try:
        try:
            b = run_bench(args, children)
        finally:
            children.stop_all()
        print(render_all(b, args.markdown))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(b.to_json(), f, indent=1, default=str)
            print(f"wrote {args.json}")
        if args.plot:
            from .plots import write_plots

            for path in write_plots(b, args.plot):
                print(f"wrote {path}")
        return 0 if all(r.ok or r.na for r in b.runs + b.memory_runs) else 1
    except KeyboardInterrupt:
        print("livemig bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
    except MigrationError as exc:
        print(f"livemig bench: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)
