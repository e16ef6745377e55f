"""``livemig bench``: the command line (options, help, exit status) and the run loop.

Options are checked by :func:`.config.parse_options` before anything starts; the runs fill a
:class:`.results.Bench` that :mod:`.render`, :mod:`.plots` and ``--json`` read.
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
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING

from ..compress.auto import AUTO, accepted
from ..compress.auto import candidates as auto_candidates
from ..errors import MigrationError, ParameterError
from ..ui.errors import EXIT_USAGE, report_error
from ..units import plural
from .config import DEFAULT_MEMORY, DEFAULT_METHODS, MEMORY_TABLE_CHANNELS, BenchConfig, parse_options, sections
from .data import host_info, sample_data, zero_page_fraction, zstd1_ratio
from .limits import measure_codec, measure_loopback
from .model import BenchError, Run
from .procs import Children, NetNamespace
from .render import bandwidth_label, render_bench, render_sweep
from .results import Bench, DataSample
from .runner import Experiment, run_livemig, tls_experiment
from .vm_peer import run_livemig_vm

if TYPE_CHECKING:
    from .qemu_peer import QemuPeer

PROG = "livemig bench"

DESCRIPTION = """\
Measure the table of QEMU's qatzip-compression.rst (total time, downtime, throughput,
pages per second, send and receive CPU) on this host, one real migration per method.

For each bandwidth, repeat and method, bench runs "livemig migrate --local" (separate
source and destination processes over loopback); with --peer qemu it runs the same
experiment with QEMU's own migration. It prints one table per bandwidth with medians
(and min..max when repeated), the memory table (--memory-table), every statistic of
every run (--json FILE) and PNG plots (--plot DIR).

Examples:
  livemig bench                                 qatzip, zstd, none; 8 channels; 10Gbps; 2G
  livemig bench --memory 2G --peer qemu         QEMU's migration side by side
  livemig bench --memory-table                  also memory used at 2, 4 and 8 channels
  livemig bench --bandwidth 1Gbps,10Gbps,0 --plot plots
                                                sweep the cap (0 = uncapped)
  livemig bench --corpus DIR --repeat 3 --markdown --json bench.json
                                                RAM filled with the files of DIR
  livemig bench --tls --methods zstd,none       each row plain and over TLS, with
                                                a tls/plain ratio row
  livemig bench --link-rate 10Gbit --peer qemu  also rows over a link shaped with tc
                                                tbf, both engines' limiters off
  livemig bench --memory 1G,4G,8G               size sweep, time per GiB summary
  livemig bench --methods none,zstd,qatzip,auto auto against the fixed methods
  livemig bench --memory 1G --workload dirty --dirty-rate 100000 --working-set 131072
      --bandwidth 1Gbps --methods zstd --auto-converge --postcopy-ram --timeout 300
                                                a busy guest: precopy, auto-converge and
                                                post-copy rows side by side

Columns:
  Total time, down time, throughput, pages per second
                     as the engine's query-migrate result reports them
  send/recv cpu %    each side's process CPU time over the migration's wall
                     time; 100 = one core busy
  N-core limit(ms)   max(RAM/compress + RAM/decompress + wire/loopback, wire/cap),
                     each speed measured with N threads at once (all cores busy)
                     on a sample of the same data; cap = max-bandwidth or the
                     --link-rate; an auto row's limit is its pick's
  % of limit         limit / total time
  sent (MiB)         TCP payload bytes that crossed the sockets, counted on the
                     loopback of a private network namespace (--no-netns: the
                     engine's own wire-bytes count)
  pages/RAM          pages sent per guest RAM page (1.00x: none sent twice)

A method, guest or peer that cannot run here gets an "n/a: <reason>" row and the
rest runs; a failed run shows its error and does not stop the others. Ctrl-C or
SIGTERM stops every child process. The header shows the load average before and
after: figures are only as good as the host is quiet.

Exit status: 0 when every attempted run succeeded, 1 if one failed, 2 on a bad
option (checked before anything runs), 130 on Ctrl-C.
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``livemig bench``."""
    p = subparsers.add_parser(
        "bench",
        help="measure the migration table (time, downtime, throughput, pages/s, CPU) per compression method",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma list of {', '.join(accepted())} (auto: livemig picks at setup; default {DEFAULT_METHODS})",
    )
    p.add_argument("--memory", default=DEFAULT_MEMORY,
                   help=f"guest RAM; a comma list (1G,4G,8G) sweeps the size, one set of tables per size and a "
                        f"time-per-GiB summary (default {DEFAULT_MEMORY})")
    p.add_argument("--multifd-channels", type=int, default=8, help="multifd channels (default 8)")
    p.add_argument(
        "--bandwidth",
        default="10Gbps",
        help="max-bandwidth, e.g. 1Gbps, 10Gbps, 500MiB/s; a comma list sweeps (0 = uncapped; default 10Gbps)",
    )
    p.add_argument("--link-rate", metavar="RATE",
                   help="also run every row over a link shaped to RATE (10Gbit, 1Gbit; a comma list sweeps) with "
                        "tc tbf on the bench's private network namespace, max-bandwidth off on both engines "
                        "(QEMU included): rows 'cap' (--bandwidth) and 'link' side by side")
    p.add_argument("--corpus", metavar="DIR", help="fill RAM with the files of DIR (e.g. Silesia)")
    p.add_argument(
        "--fill",
        default="corpus",
        help="RAM fill when no --corpus: corpus (built-in, default), zero, random, files:DIR, image:PATH",
    )
    p.add_argument("--guest", choices=["kvm", "portable"], help="guest kind (default: kvm where it works)")
    p.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--workload", default="idle", choices=["idle", "dirty", "counter"], help="vCPU workload")
    p.add_argument("--dirty-rate", type=int, metavar="PAGES_PER_S",
                   help="pages per second the dirty and counter workloads write (default: livemig migrate's, 20000)")
    p.add_argument("--working-set", type=int, metavar="PAGES",
                   help="pages those workloads write over and over (default 0 = all RAM)")
    p.add_argument("--auto-converge", action="store_true",
                   help="also a row per method with capability auto-converge (QEMU's default throttle "
                        "parameters), beside the plain precopy one")
    p.add_argument("--postcopy-ram", action="store_true",
                   help="also a row per method with capability postcopy-ram: migrate-start-postcopy after "
                        "--postcopy-after-passes (time in post-copy, pages requested, fault latency)")
    p.add_argument("--postcopy-after-passes", type=int, metavar="N",
                   help="post-copy rows switch after precopy pass N (default 1)")
    p.add_argument("--convergence", metavar="LIST",
                   help="the rows of each method, a comma list of precopy, auto-converge, postcopy (instead of "
                        "--auto-converge/--postcopy-ram); a run still migrating at --timeout is reported "
                        "'did not converge in T s'")
    p.add_argument("--level", type=int, default=1, help="level: zlib 0-9, zstd 0-20, qatzip 1-9 (default 1)")
    p.add_argument("--downtime-limit", type=int, help="downtime-limit in ms (default: the engine's, 300)")
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the table shows medians")
    p.add_argument("--peer", choices=["qemu"], help="also run QEMU's own migration (qemu-system-x86_64)")
    p.add_argument(
        "--memory-table", action="store_true", help="also measure memory needs at 2, 4, 8 channels"
    )
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", metavar="FILE",
                   help="write every statistic of every run to FILE ('-' = stdout, the tables go to stderr)")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR (created if its parent exists)")
    p.add_argument("--sample", default="32M", help="data sample for codec speeds and ratio (default 32M)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    p.add_argument("--no-netns", action="store_true", help="do not count socket bytes in a private netns")
    p.add_argument("--tls", action="store_true",
                   help="run each row again over TLS on every channel (x509 made on the fly): rows METHOD and "
                        "METHOD+tls side by side, then their ratio")
    p.set_defaults(func=main)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _measure_data(b: Bench) -> None:
    """Codec speeds, zstd-1 ratio and zero-page share on a sample of the guest's data; loopback cost."""
    c = b.config
    try:
        sample = sample_data(c.fill, c.sample, memory=c.memory)
    except MigrationError as exc:
        b.codec_errors = {m: str(exc) for m in c.methods}
        _progress(f"bench: data sample unavailable: {exc}")
        return
    # auto's rows take the limit of what they picked: its candidates are measured as "zstd-1", "none"
    todo = [(m, c.level, m) for m in c.methods if m != AUTO]
    if AUTO in c.methods:
        todo += [(m, lv or 1, m if lv is None else f"{m}-{lv}") for m, lv in auto_candidates()]
    for m, level, key in todo:
        reason = dict(c.unavailable).get(m)
        if reason:
            b.codec_errors[key] = reason
            continue
        try:
            b.codecs[key] = measure_codec(m, sample, level=level, threads=b.cores)
        except MigrationError as exc:
            b.codec_errors[key] = str(exc)
    b.data = DataSample(len(sample), zero_page_fraction(sample), zstd1_ratio(sample))
    b.loopback = measure_loopback(connections=b.cores)


def run_sweep(config: BenchConfig, children: Children) -> list[Bench]:
    """One :func:`run_bench` per section (guest size, link rate: :func:`.config.sections`), the codec
    and loopback speeds measured once for all. KeyboardInterrupt propagates."""
    out: list[Bench] = []
    for sec in sections(config):
        out.append(run_bench(sec, children, out[0] if out else None))
    return out


def run_bench(config: BenchConfig, children: Children, measured: Bench | None = None) -> Bench:
    """Measure everything ``config`` asks for (codec and loopback speeds: ``measured``'s when given).
    KeyboardInterrupt propagates (children stopped by caller)."""
    c = config
    b = Bench(host_info(), c)
    b.host["loadavg-before"] = os.getloadavg()[0]
    if b.host["loadavg-before"] > 0.5 * b.cores:
        _progress(
            f"bench: warning: load average {b.host['loadavg-before']:.1f} on {b.cores} cores;"
            " other work will slow the runs and the codec measurements alike"
        )
    if measured is None:
        _progress("bench: measuring codec speeds on a data sample ...")
        _measure_data(b)
    else:
        b.data, b.codecs, b.codec_errors, b.loopback = (measured.data, measured.codecs, measured.codec_errors,
                                                        measured.loopback)
    exp = Experiment(c.guest, c.memory, c.workload, c.fill, c.smp, c.level, c.downtime_limit, c.timeout,
                     workload_args=c.workload_args(), postcopy_after_passes=c.postcopy_after_passes)
    workdir = tempfile.mkdtemp(prefix="livemig-bench-")
    tls_exp = tls_experiment(exp, workdir) if c.tls else None
    netns: NetNamespace | None = None
    if c.netns:
        try:
            netns = NetNamespace(children)
        except BenchError as exc:
            if c.link_rate:
                raise BenchError(f"--link-rate: {exc}") from exc
            _progress(f"bench: socket bytes not counted: {exc}")
    if netns is not None and c.link_rate:
        netns.shape(c.link_rate)
        _progress(f"bench: loopback shaped to {bandwidth_label(c.link_rate)} (tc tbf), max-bandwidth off")
    peer = None
    if c.peer == "qemu":
        from .qemu_peer import QemuPeer  # qemu.qmp is loaded only for --peer qemu

        peer = QemuPeer(children, exp, workdir, netns)
        b.peer_info = peer.describe()
    try:
        plan = [(bw, rep, m, conv) for bw in c.bandwidths for rep in range(c.repeat) for m in c.methods
                for conv in c.convergence]
        for i, (bw, rep, m, conv) in enumerate(plan, 1):
            # QEMU's rows: plain precopy only, beside livemig's precopy row
            b.runs += _one(b, children, replace(exp, convergence=conv), m, c.channels, bw, rep, workdir, netns,
                           f"{i}/{len(plan)}", peer if conv == "precopy" else None)
            if tls_exp is not None:
                b.runs += _one(b, children, replace(tls_exp, convergence=conv), m, c.channels, bw, rep, workdir,
                               netns, f"{i}/{len(plan)} tls", None)
        if c.memory_table:
            for ch in MEMORY_TABLE_CHANNELS:
                for m in c.methods:
                    key = ("livemig", m, ch, c.bandwidths[0])
                    reuse = [r for r in b.runs if (r.peer, r.method, r.channels, r.bandwidth) == key]
                    if reuse:
                        b.memory_runs += reuse
                        continue
                    b.memory_runs += _one(b, children, exp, m, ch, c.bandwidths[0], 0, workdir, netns,
                                          f"memory {plural(ch, 'channel')}", None)  # fmt: skip
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
    tag: str,
    peer: QemuPeer | None,
) -> list[Run]:
    """The livemig run (or its n/a) of one method, and the QEMU run when there is a peer."""
    out: list[Run] = []
    reason = b.config.method_na(method)
    if reason:
        out.append(Run("livemig", exp.label(method), channels, bw, rep, na=reason))
    else:
        _progress(f"bench {tag}: livemig {exp.label(method)}, {plural(channels, 'channel')}, "
                  f"{bandwidth_label(bw)} ...")
        t0 = time.monotonic()
        if exp.extra_args:  # options only `livemig migrate` has
            run = run_livemig(children, exp, method, channels, bw, rep, workdir, netns)
        else:
            run = run_livemig_vm(children, exp, method, channels, bw, rep, workdir, netns)
        _progress(f"bench {tag}: {'ok' if run.ok else run.error} ({time.monotonic() - t0:.1f} s)")
        out.append(run)
    if peer is not None and method == AUTO:
        out.append(Run("qemu", method, channels, bw, rep, na="QEMU has no multifd-compression auto (livemig's own)"))
    elif peer is not None:
        _progress(f"bench {tag}: QEMU {method}, {plural(channels, 'channel')}, {bandwidth_label(bw)} ...")
        t0 = time.monotonic()
        prun = peer.run(method, channels, bw, rep)
        _progress(
            f"bench {tag}: QEMU {'ok' if prun.ok else prun.na or prun.error} ({time.monotonic() - t0:.1f} s)"
        )
        out.append(prun)
    return out


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _check_outputs(args: argparse.Namespace) -> None:
    """--json FILE and --plot DIR must be writable before hours of runs (ParameterError naming the option).

    ``--json -`` is stdout. A missing parent directory is refused, as ``livemig migrate`` does; of
    --plot DIR only DIR itself is created (at the end), never its parents.
    """
    if args.json and args.json != "-":
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise ParameterError(f"--json {args.json}: directory {parent} does not exist")
        if os.path.isdir(args.json) or not os.access(parent, os.W_OK):
            raise ParameterError(f"--json {args.json}: cannot write it (not a file in a writable directory)")
    if args.plot:
        target = os.path.abspath(args.plot)
        parent = os.path.dirname(target)
        if os.path.exists(target):
            if not os.path.isdir(target) or not os.access(target, os.W_OK):
                raise ParameterError(f"--plot {args.plot}: not a writable directory")
        elif not os.path.isdir(parent):
            raise ParameterError(f"--plot {args.plot}: directory {parent} does not exist")
        elif not os.access(parent, os.W_OK):
            raise ParameterError(f"--plot {args.plot}: cannot create it in {parent} (not writable)")


def _write_results(benches: list[Bench], args: argparse.Namespace) -> None:
    """The tables (stderr when --json - takes stdout), --json FILE and --plot DIR (the first section's;
    a sweep's JSON is ``{"sections": [...]}``, one bench's JSON each)."""
    out = sys.stderr if args.json == "-" else sys.stdout
    print("\n\n".join(render_bench(b, args.markdown) for b in benches), file=out)
    if len(benches) > 1:
        print("\n" + render_sweep(benches), file=out)
    data = benches[0].to_json() if len(benches) == 1 else {"sections": [b.to_json() for b in benches]}
    if args.json == "-":
        json.dump(data, sys.stdout, indent=1, default=str)
        print(flush=True)
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
        print(f"wrote {args.json}", file=out)
    if args.plot:
        from .plots import write_plots

        for path in write_plots(benches[0], args.plot):
            print(f"wrote {path}", file=out)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``livemig bench``: the exit status (0 all runs succeeded, 1 one failed, 2 bad option,
    130 interrupted); errors are printed once by :func:`livemig.ui.errors.report_error`."""
    try:
        config = parse_options(args)
        _check_outputs(args)
    except (ParameterError, BenchError) as exc:
        report_error(exc, PROG)
        return EXIT_USAGE
    old = signal.signal(signal.SIGTERM, _sigterm)
    children = Children()
    try:
        try:
            benches = run_sweep(config, children)
        finally:
            children.stop_all()
        _write_results(benches, args)
        return 0 if all(b.ok() for b in benches) else 1
    except KeyboardInterrupt as exc:
        exc.add_note("child processes stopped")
        return report_error(exc, PROG)
    except (MigrationError, OSError) as exc:
        return report_error(exc, PROG)
    finally:
        signal.signal(signal.SIGTERM, old)
