"""``livemig migrate`` and ``livemig incoming``: the two ends, as separate processes.

``livemig migrate --local`` starts ``livemig incoming`` itself on a free loopback port (same guest
options, destination RAM prefaulted before the migration starts, as QEMU's ``-mem-prealloc``) and
migrates to it, for one-command use.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ..errors import MigrationError, ParameterError
from ..guest import GuestConfig, create_guest, default_kind, kvm_unavailable
from ..params import MigrationParameters
from ..transport.address import parse_address
from ..units import parse_rate, parse_size
from .destination import Destination
from .source import Source


def _add_params(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("migration parameters (QEMU's names and defaults)")
    g.add_argument("--multifd-channels", type=int, default=2, metavar="N", help="1..255 (default 2)")
    g.add_argument("--multifd-compression", default="none", metavar="METHOD",
                   help="none, zlib, zstd, qatzip, qpl or uadk (default none)")
    g.add_argument("--multifd-zlib-level", type=int, default=1, metavar="L", help="0..9 (default 1)")
    g.add_argument("--multifd-zstd-level", type=int, default=1, metavar="L", help="0..20 (default 1)")
    g.add_argument("--multifd-qatzip-level", type=int, default=1, metavar="L", help="1..9 (default 1)")
    g.add_argument("--max-bandwidth", default="128MiB/s", metavar="RATE",
                   help="cap on bytes written to the sockets, after compression: 10Gbps, 1GiB/s, 0 = "
                        "unlimited (default 128MiB/s, QEMU's)")
    g.add_argument("--downtime-limit", type=int, default=300, metavar="MS", help="default 300")
    g.add_argument("--zero-page-detection", default="multifd", choices=["multifd", "none"])
    g.add_argument("--max-passes", type=int, default=0, metavar="N",
                   help="switch over after N passes even if the downtime limit is not met (0 = never)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds without progress on a channel before the migration fails (default 30)")
    p.add_argument("--uuid", default="", help="VM UUID checked in every multifd handshake (default all zero)")
    p.add_argument("--full-verify", action="store_true",
                   help="hash all of RAM at switchover (also catches writes the dirty log missed; adds downtime)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.add_argument("--dump-ram", metavar="DIR", help="write RAM at switchover into DIR (for tests)")


def _add_guest(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("guest")
    g.add_argument("--guest", choices=["kvm", "portable"], default=None,
                   help="guest kind (default: kvm where /dev/kvm works, else portable)")
    g.add_argument("--memory", default="1G" if required else None, help="guest RAM (default 1G)")
    g.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    g.add_argument("--workload", choices=["idle", "dirty", "counter"], default="idle")
    g.add_argument("--dirty-rate", type=int, default=20000, metavar="PAGES_PER_S")
    g.add_argument("--working-set", type=int, default=0, metavar="PAGES", help="0 = all RAM")
    g.add_argument("--fill", default="corpus", help="zero, random, corpus, files:DIR or image:PATH (default corpus)")
    g.add_argument("--seed", type=int, default=0)


def params_from_args(args: argparse.Namespace) -> MigrationParameters:
    p = MigrationParameters(
        multifd_channels=args.multifd_channels,
        multifd_compression=args.multifd_compression,
        multifd_zlib_level=args.multifd_zlib_level,
        multifd_zstd_level=args.multifd_zstd_level,
        multifd_qatzip_level=args.multifd_qatzip_level,
        max_bandwidth=parse_rate(args.max_bandwidth),
        downtime_limit=args.downtime_limit,
        zero_page_detection=args.zero_page_detection,
        max_passes=args.max_passes,
    )
    p.check()
    return p


def guest_config_from_args(args: argparse.Namespace) -> GuestConfig:
    kind = args.guest or default_kind()
    if args.guest is None and kind == "portable":
        print(f"livemig: /dev/kvm not usable ({kvm_unavailable()}): using the portable guest", file=sys.stderr)
    return GuestConfig(
        kind=kind,
        memory=parse_size(args.memory),
        smp=args.smp,
        workload=args.workload,
        dirty_rate=args.dirty_rate,
        working_set=args.working_set,
        fill=args.fill,
        seed=args.seed,
    )


def _uuid(text: str) -> bytes:
    if not text:
        return bytes(16)
    import uuid

    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise ParameterError(
            f"invalid --uuid '{text}': expected a UUID like 123e4567-e89b-12d3-a456-426614174000"
        ) from None


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


class _Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.stop = threading.Event()
        self.tty = sys.stderr.isatty()

    def run(self, src: Source) -> None:
        period = 0.5 if self.tty else 2.0
        while not self.stop.wait(period):
            src.meter.sample()
            if not self.quiet and src.status.state in ("setup", "active", "device"):
                line = src.stats.progress_line()
                print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def cmd_migrate(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    gcfg = guest_config_from_args(args)
    child: subprocess.Popen[bytes] | None = None
    tmpdir = tempfile.mkdtemp(prefix="livemig-")
    dst_json = os.path.join(tmpdir, "destination.json")
    guest = None
    try:
        if args.local:
            uri, child = _start_local_destination(args, gcfg, tmpdir, dst_json)
        else:
            if not args.uri:
                raise ParameterError("livemig migrate needs a destination URI (tcp:HOST:PORT) or --local")
            uri = args.uri
        address = parse_address(uri)
        t0 = time.monotonic()
        guest = create_guest(gcfg)
        if not args.quiet:
            print(f"livemig: {gcfg.kind} guest, {parse_size(args.memory) >> 20} MiB, fill {gcfg.fill} "
                  f"({time.monotonic() - t0:.1f} s), workload {gcfg.workload}", file=sys.stderr)
        guest.start()
        if args.run_before:
            time.sleep(args.run_before)
        src = Source(guest, address, params, uuid=_uuid(args.uuid), timeout=args.timeout,
                     full_verify=args.full_verify, dump_ram=args.dump_ram,
                     wait_report=args.run_after if args.local else 0.0)
        if not args.quiet:
            print(f"livemig: migrating to {address} with {params.multifd_channels} channels, "
                  f"{src.method.name}: {src.method.backend()}", file=sys.stderr)
        progress = _Progress(args.quiet)
        pt = threading.Thread(target=progress.run, args=(src,), daemon=True)
        pt.start()
        old = signal.signal(signal.SIGINT, lambda *_: src.cancel())
        try:
            stats = src.run()
        finally:
            signal.signal(signal.SIGINT, old)
            progress.stop.set()
            pt.join()
        if child is not None:
            _wait_child(child, args.timeout + args.run_after)
            if os.path.exists(dst_json):
                with open(dst_json) as f:
                    dres = json.load(f)
                for key in ("progress_after", "workload_check", "error-desc"):
                    if key in dres:
                        stats.destination.setdefault(key, dres[key])
                if dres.get("status") == "failed" and stats.status != "completed":
                    stats.destination.setdefault("status", "failed")
        result = stats.to_qapi()
        if stats.status == "completed" and guest.running:
            result["livemig"]["source-guest"] = "running"
        else:
            result["livemig"]["source-guest"] = "running" if guest.running else "paused (postmigrate)"
        _write_json(args.json, result)
        if not args.quiet or stats.status != "completed":
            print(stats.table())
        return 0 if stats.status == "completed" else 1
    finally:
        if child is not None and child.poll() is None:
            _kill(child)
        if guest is not None:
            guest.close()
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)


def _start_local_destination(args: argparse.Namespace, gcfg: GuestConfig, tmpdir: str, dst_json: str
                             ) -> tuple[str, subprocess.Popen[bytes]]:
    port_file = os.path.join(tmpdir, "port")
    cmd = [
        sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file", port_file,
        "--json", dst_json, "--guest", gcfg.kind, "--memory", str(gcfg.memory), "--smp", str(gcfg.smp),
        "--multifd-channels", str(args.multifd_channels), "--multifd-compression", args.multifd_compression,
        "--multifd-zlib-level", str(args.multifd_zlib_level), "--multifd-zstd-level", str(args.multifd_zstd_level),
        "--multifd-qatzip-level", str(args.multifd_qatzip_level), "--timeout", str(args.timeout),
        "--uuid", args.uuid, "--run-after", str(args.run_after),
    ]
    if args.dump_ram:
        cmd += ["--dump-ram", args.dump_ram]
    if args.full_verify:
        cmd.append("--full-verify")
    child = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(port_file):
        if child.poll() is not None:
            raise MigrationError(f"the local destination exited with status {child.returncode} before listening")
        if time.monotonic() > deadline:
            _kill(child)
            raise MigrationError("the local destination did not start listening within 300 s")
        time.sleep(0.02)
    with open(port_file) as f:
        port = int(f.read())
    return f"tcp:127.0.0.1:{port}", child


def _wait_child(child: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        child.wait(timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        _kill(child)


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()


def cmd_incoming(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    address = parse_address(args.uri)
    guest = None
    if args.memory:
        gcfg = guest_config_from_args(args)
        t0 = time.monotonic()
        guest = create_guest(gcfg, incoming=True)
        print(f"livemig incoming: {gcfg.kind} guest, {gcfg.memory >> 20} MiB prefaulted in "
              f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
    dst = Destination(address, params, guest=guest, uuid=_uuid(args.uuid), timeout=args.timeout,
                      run_after=args.run_after, dump_ram=args.dump_ram, full_verify=args.full_verify,
                      log=lambda m: print(f"livemig incoming: {m}", file=sys.stderr))
    signal.signal(signal.SIGTERM, lambda *_: dst.fail(MigrationError("terminated"), "destination"))
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(dst.port))
        os.replace(tmp, args.port_file)
    print(f"livemig incoming: listening on {address.scheme}:{address.host}:{dst.port}", file=sys.stderr)
    try:
        result = dst.run()
        _write_json(args.json, result)
        if result.get("status") != "completed":
            print(f"livemig incoming: failed: {result.get('error-desc')}", file=sys.stderr)
            return 1
        print(f"livemig incoming: completed; guest resumed (progress {result.get('progress_at_resume')}"
              f" -> {result.get('progress_after', '-')})", file=sys.stderr)
        return 0
    finally:
        if dst.guest is not None:
            dst.guest.close()


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("migrate", help="migrate a guest to a destination (source side)",
                       description="Start a guest and migrate it live to `livemig incoming` at URI.")
    m.add_argument("uri", nargs="?", help="destination, tcp:HOST:PORT")
    m.add_argument("--local", action="store_true",
                   help="start the destination here as a separate process on a free loopback port")
    m.add_argument("--run-before", type=float, default=0.0, metavar="S",
                   help="let the guest run S seconds before migrating")
    m.add_argument("--run-after", type=float, default=0.0, metavar="S",
                   help="with --local: let the migrated guest run S seconds and report its progress")
    m.add_argument("--quiet", action="store_true", help="no progress display")
    _add_guest(m, required=True)
    _add_params(m)
    m.set_defaults(func=cmd_migrate)

    i = sub.add_parser("incoming", help="wait for a migration (destination side)",
                       description="Listen at URI, receive a migration, resume the guest.")
    i.add_argument("uri", help="where to listen, tcp:HOST:PORT (port 0 = any free port)")
    i.add_argument("--port-file", help="write the listening port to this file once ready")
    i.add_argument("--run-after", type=float, default=0.0, metavar="S",
                   help="after resuming, let the guest run S seconds and report its progress")
    _add_guest(i, required=False)
    _add_params(i)
    i.set_defaults(func=cmd_incoming)
