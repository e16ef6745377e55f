"""``livemig migrate`` and ``livemig incoming``: the two ends, as separate processes.

``livemig migrate --local`` starts two ``livemig vm`` processes (the destination with ``--incoming
defer``, its RAM prefaulted before the migration starts, as QEMU's ``-mem-prealloc``) and drives them
over QMP as ``livemig bench`` drives QEMU (:mod:`.local`), for one-command use.

Every option is checked (:func:`check_migrate`, :func:`check_incoming`) before a guest is created or
a socket opened; failures are raised and rendered once by :func:`livemig.ui.errors.report_error`.
Progress goes to stderr (:mod:`livemig.ui.progress`), the result to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from ..compress import create_method
from ..compress.auto import AUTO
from ..errors import MigrationError, ParameterError, os_reason
from ..guest import GuestConfig, create_guest
from ..params import MigrationParameters, check_option, parse_option
from ..transport.address import Address, claim_unix_path, parse_address
from ..transport.secure import tls_connector
from ..transport.tls import Tls
from ..ui.errors import OutcomeUnknown, Terminated
from ..ui.progress import ProgressDisplay
from ..units import format_size, plural
from . import protocol
from .guestopts import add_guest_options, guest_config_from_args
from .local import LocalMigration
from .local import plan as local_plan
from .postcopyopts import add_postcopy_options, check_postcopy, postcopy_kwargs, resume_when_paused
from .source import Source
from .stats import MigrationStats, info_table
from .tlsopts import add_tls_options, local_server_args, tls_from_args
from .to_qemu import QemuPeer, add_peer_options, check_peer_options

#: the shortest --timeout: below it, scheduling delays of a loaded host alone would fail a migration
MIN_TIMEOUT = 0.1

URI_FORMS = "tcp:HOST:PORT (HOST may be [IPv6]), unix:PATH (a Unix socket file) or file:PATH (a mapped-ram file)"


def _add_params(p: argparse.ArgumentParser, source: bool) -> None:
    only = "" if source else " (the source's policy: accepted, not used here)"
    g = p.add_argument_group("migration parameters (QEMU's names and defaults)")
    g.add_argument("--multifd-channels", type=int, default=2, metavar="N", help="1..255 (default 2)")
    g.add_argument("--multifd-compression", default="none", metavar="METHOD",
                   help="none, zlib, zstd, qatzip, qpl or uadk, or auto (livemig's own: the source picks the "
                        "method predicted to finish first; a destination with auto takes the source's pick) "
                        "(default none)")
    g.add_argument("--multifd-zlib-level", type=int, default=1, metavar="L", help="0..9 (default 1)")
    g.add_argument("--multifd-zstd-level", type=int, default=1, metavar="L", help="0..20 (default 1)")
    g.add_argument("--multifd-qatzip-level", type=int, default=1, metavar="L", help="1..9 (default 1)")
    g.add_argument("--max-bandwidth", default="128MiB/s", metavar="RATE",
                   help="cap on bytes written to the sockets, after compression: 10Gbps, 100Mbit/s (bits/s), "
                        f"1GiB/s, 128M (bytes/s), 0 = unlimited (default 128MiB/s, QEMU's){only}")
    g.add_argument("--downtime-limit", type=int, default=300, metavar="MS", help=f"0..2000000 (default 300){only}")
    g.add_argument("--zero-page-detection", default="multifd", choices=["multifd", "none"])
    g.add_argument("--max-passes", type=int, default=0, metavar="N",
                   help=f"switch over after N passes even if the downtime limit is not met (0 = never){only}")
    add_throttle_options(p, only)
    add_postcopy_options(p, source)
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help=f"seconds without progress on a channel before the migration fails ({MIN_TIMEOUT:g} or "
                        "more, finite; default 30)")
    p.add_argument("--uuid", default="", help="VM UUID checked in every multifd handshake (default all zero)")
    p.add_argument("--full-verify", action="store_true",
                   help="hash all of RAM at switchover (also catches writes the dirty log missed; adds downtime)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE ('-' = stdout)")
    p.add_argument("--dump-ram", metavar="DIR",
                   help="write RAM at switchover into DIR, one file per RAM block (for tests; from a QEMU "
                        "source: NAME.bin, the block's name %%-escaped)")


def add_throttle_options(p: argparse.ArgumentParser, only: str = "") -> None:
    """``--auto-converge`` and QEMU's throttle parameters (docs/wire.md, "Convergence"), checked by
    :meth:`MigrationParameters.check`; shared by ``livemig migrate``, ``incoming`` and ``bench``."""
    g = p.add_argument_group("auto-converge (QEMU's capability and parameters)")
    g.add_argument("--auto-converge", action="store_true",
                   help=f"throttle the guest's vCPUs while it dirties memory faster than it is sent{only}")
    g.add_argument("--cpu-throttle-initial", type=int, default=20, metavar="PCT",
                   help="percent of vCPU time taken away when throttling starts: 1..99 (default 20)")
    g.add_argument("--cpu-throttle-increment", type=int, default=10, metavar="PCT",
                   help="percent added each time the guest still dirties too fast: 1..99 (default 10)")
    g.add_argument("--cpu-throttle-tailslow", action="store_true",
                   help="near the end, add only what brings the dirty rate to the threshold (default off)")
    g.add_argument("--max-cpu-throttle", type=int, default=99, metavar="PCT",
                   help="the most percent of vCPU time taken away: 1..99 (default 99)")
    g.add_argument("--throttle-trigger-threshold", type=int, default=50, metavar="PCT",
                   help="throttle when the bytes dirtied in a period exceed PCT percent of the bytes sent in it: "
                        "1..100 (default 50)")


def params_from_args(args: argparse.Namespace) -> MigrationParameters:
    """The migration parameters of the command line, checked (ParameterError names the first bad one)."""
    p = MigrationParameters(
        multifd_channels=args.multifd_channels,
        multifd_compression=args.multifd_compression,
        multifd_zlib_level=args.multifd_zlib_level,
        multifd_zstd_level=args.multifd_zstd_level,
        multifd_qatzip_level=args.multifd_qatzip_level,
        max_bandwidth=parse_option("--max-bandwidth", args.max_bandwidth, "rate"),
        max_postcopy_bandwidth=parse_option("--max-postcopy-bandwidth",
                                            getattr(args, "max_postcopy_bandwidth", "0"), "rate"),
        downtime_limit=args.downtime_limit,
        zero_page_detection=args.zero_page_detection,
        max_passes=args.max_passes,
        cpu_throttle_initial=args.cpu_throttle_initial,
        cpu_throttle_increment=args.cpu_throttle_increment,
        cpu_throttle_tailslow=args.cpu_throttle_tailslow,
        max_cpu_throttle=args.max_cpu_throttle,
        throttle_trigger_threshold=args.throttle_trigger_threshold,
    )
    try:
        p.check()
    except ParameterError as exc:  # QEMU's words name the parameter; here the option is what was typed
        m = re.fullmatch(r"Parameter '([\w-]+)' (.*)", str(exc), re.S)
        if m is None:
            raise
        name = m.group(1).replace("_", "-")
        shown = getattr(args, name.replace("-", "_"), "")
        detail = re.sub(r"^expects ", "expected ", m.group(2))
        detail = detail.replace(f"does not accept value '{shown}'", "not accepted")
        raise ParameterError(f"--{name} {shown}: {detail}") from exc
    if p.multifd_compression != AUTO:  # MethodUnavailable now, not after the guest filled
        create_method(p.multifd_compression, p.level(), 4096)
    return p


def _uuid(text: str) -> bytes:
    if not text:
        return bytes(16)
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise ParameterError(f"--uuid '{text}': expected a UUID like 123e4567-e89b-12d3-a456-426614174000") from None


@dataclass
class Checked:
    """A command line's options, all checked."""

    params: MigrationParameters
    guest: GuestConfig | None
    address: Address | None
    uuid: bytes
    #: TLS settings (None: plaintext) and, for ``migrate --local``, its destination's TLS options
    tls: Tls | None = None
    local_tls: list[str] | None = None
    #: incoming without --memory: the largest guest accepted (None: what the host can give)
    max_memory: int | None = None


def _check_seconds(args: argparse.Namespace) -> None:
    check_option("--timeout", args.timeout, minimum=MIN_TIMEOUT, what="a number of seconds")
    check_option("--run-after", args.run_after, what="a number of seconds")


def _check_common(args: argparse.Namespace) -> tuple[MigrationParameters, bytes]:
    if args.dump_ram and not os.path.isdir(args.dump_ram):
        parent = os.path.dirname(os.path.abspath(args.dump_ram))
        if os.path.exists(args.dump_ram) or not os.path.isdir(parent):
            raise ParameterError(f"--dump-ram {args.dump_ram}: expected a directory, or a new one in an existing "
                                 "directory")
    if args.json and args.json != "-":
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise ParameterError(f"--json {args.json}: directory {folder} does not exist")
    return params_from_args(args), _uuid(args.uuid)


def resolve(address: Address, uri: str) -> None:
    """Refuse a tcp: destination whose host does not resolve (socket.getaddrinfo), before a guest is
    built and filled. Raises ParameterError naming the URI and the resolver's words."""
    if address.scheme != "tcp":
        return
    try:
        socket.getaddrinfo(address.host, address.port, address.family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ParameterError(f"destination '{uri}': cannot resolve host '{address.host}': {os_reason(exc)}") from exc


def check_migrate(args: argparse.Namespace) -> Checked:
    """Every option of ``livemig migrate``; ParameterError naming the first bad one."""
    _check_seconds(args)
    check_option("--run-before", args.run_before, what="a number of seconds")
    if args.local and args.uri:
        raise ParameterError(f"--local starts its own destination, so the URI '{args.uri}' would be ignored: "
                             "give one or the other")
    if not args.local and not args.uri:
        raise ParameterError(f"a destination is needed: a URI, {URI_FORMS}, or --local")
    if args.run_after and not args.local:
        raise ParameterError("--run-after needs --local (on two hosts, give --run-after to livemig incoming)")
    address = parse_address(args.uri) if args.uri else None
    if address is not None:
        resolve(address, args.uri)
    params, uuid = _check_common(args)
    check_postcopy(args)
    check_peer_options(args)
    tls = tls_from_args(args, True, address)
    return Checked(params, guest_config_from_args(args), address, uuid, tls,
                   local_server_args(tls) if args.local else None)


def check_incoming(args: argparse.Namespace) -> Checked:
    """Every option of ``livemig incoming``; ParameterError naming the first bad one."""
    _check_seconds(args)
    max_memory = parse_option("--max-memory", args.max_memory, "size") if args.max_memory else None
    address = parse_address(args.uri)
    if address.scheme == "unix":
        claim_unix_path(address.path)  # before a guest is prefaulted
    params, uuid = _check_common(args)
    tls = tls_from_args(args, False, address)
    return Checked(params, guest_config_from_args(args) if args.memory else None, address, uuid, tls,
                   max_memory=max_memory)


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    if path == "-":
        json.dump(data, sys.stdout, indent=2)
        print(flush=True)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _local_vm_args(args: argparse.Namespace) -> list[str]:
    """``livemig vm`` options of both local VMs besides the guest's."""
    out = ["--timeout", str(args.timeout)]
    if args.uuid:
        out += ["--uuid", args.uuid]
    if args.dump_ram:
        out += ["--dump-ram", args.dump_ram]
    if args.full_verify:
        out.append("--full-verify")
    return out


def destination_summary(d: dict[str, Any], workload: str) -> str:
    """The destination's outcome in one line: resumed, and after ``--run-after`` its progress and check
    (an idle guest has neither: said so, not shown as a counter that did not move)."""
    if not d.get("resumed", d.get("status") == "completed"):
        return "destination: the guest was not resumed"
    text = "destination: guest resumed"
    if "progress_after" in d and workload == "idle":
        text += "; then ran: idle guest, no progress counter, nothing to check"
    elif "progress_after" in d:
        text += f"; then ran: progress {d.get('progress_at_resume', 0)} -> {d['progress_after']}"
        check = d.get("workload_check")
        if check is not None:
            text += f", workload check {check}" if check == "ok" else f", workload check FAILED: {check}"
    return text


@contextlib.contextmanager
def _cancel_on_signals(cancel: Callable[[], None], interrupted: list[int]) -> Iterator[None]:
    """While in the block, SIGINT and SIGTERM both call ``cancel`` (from a thread: the handler may run
    while this thread holds a lock) and are recorded in ``interrupted``, as Ctrl-C does."""
    def on_signal(signum: int, _frame: Any) -> None:
        interrupted.append(signum)
        threading.Thread(target=cancel, name="cancel", daemon=True).start()

    old = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.uri and args.uri.startswith("file:"):  # mapped-ram files: migration/filecli.py
        from .filecli import cmd_migrate_file
        return cmd_migrate_file(args)
    chk = check_migrate(args)
    assert chk.guest is not None
    interrupted: list[int] = []  # SIGINT or SIGTERM: both cancel, as Ctrl-C does
    run = _migrate_local if args.local else _migrate_remote
    result, dres, summary = run(args, chk, chk.guest, interrupted)
    _write_json(args.json, result)
    if result["status"] != "completed":
        _raise_failure(result, dres, signal.SIGTERM in interrupted)
    out: TextIO = sys.stderr if args.json == "-" else sys.stdout
    print(info_table(result), file=out)
    print(summary or destination_summary({**result.get("destination", {}), "status": "completed", "resumed": True},
                                         chk.guest.workload), file=out)
    return 0


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"livemig: {message}", file=sys.stderr, flush=True)


def _migrating(args: argparse.Namespace, chk: Checked, address: Any, backend: str) -> None:
    method = (f"{chk.params.multifd_compression}: {backend}" if chk.params.multifd_compression != AUTO
              else "multifd-compression auto (picked at setup)")
    _say(args, f"migrating to {address}{' over TLS' if chk.tls else ''} on "
               f"{plural(chk.params.multifd_channels, 'channel')}, {method}")


def _migrate_remote(args: argparse.Namespace, chk: Checked, gcfg: GuestConfig, interrupted: list[int]
                    ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """This process is the source: its guest, migrated to ``chk.address``; (result, {}, the
    destination's summary line for a QEMU peer, else None)."""
    assert chk.address is not None
    peer: QemuPeer | None = None
    guest = None
    try:
        if args.peer == "qemu":  # probed, checked and configured before the guest is built
            peer = QemuPeer(args, gcfg.memory, chk.params, chk.uuid)
            _say(args, f"destination: {peer.describe()}")
        t0 = time.monotonic()
        guest = create_guest(gcfg)
        _say(args, f"{gcfg.kind} guest, {format_size(gcfg.memory)}, fill {gcfg.fill} "
                   f"({time.monotonic() - t0:.1f} s), workload {gcfg.workload}")
        guest.start()
        if args.run_before:
            time.sleep(args.run_before)
        connector = tls_connector(chk.address, chk.tls)
        make = peer.source if peer else Source
        src = make(guest, connector, chk.params, uuid=chk.uuid, timeout=args.timeout, full_verify=args.full_verify,
                   dump_ram=args.dump_ram, auto_converge=args.auto_converge, log=_source_log,
                   **postcopy_kwargs(args))
        if args.postcopy_ram and peer is None:
            resume_when_paused(src, connector, lambda text: _say(args, text))
        _migrating(args, chk, chk.address, src.method.backend())

        def poll() -> Any:
            src.meter.sample()
            return src.stats

        with _cancel_on_signals(src.cancel, interrupted), ProgressDisplay(poll, enabled=not args.quiet):
            stats = src.run()
        summary = peer.summary(stats) if peer is not None and stats.status == "completed" else None
        return stats.to_qapi(), {}, summary  # livemig.source-guest: running, paused or postmigrate; livemig.handover
    finally:
        if peer is not None:
            peer.close()
        if guest is not None:
            guest.close()


def _migrate_local(args: argparse.Namespace, chk: Checked, gcfg: GuestConfig, interrupted: list[int]
                   ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Two ``livemig vm`` processes driven over QMP (:mod:`.local`); (the source's query-migrate with
    the destination's figures under ``destination``, the destination's query-migrate)."""
    tmpdir = tempfile.mkdtemp(prefix="livemig-")
    pair = LocalMigration(gcfg, _local_vm_args(args), tmpdir)
    try:
        plan = local_plan(chk.params, chk.tls, args.run_before, args.auto_converge, args.postcopy_ram,
                          args.postcopy_after_passes or 1)
        uri = pair.connect(plan)
        _say(args, f"destination: listening on {uri}{' (TLS)' if chk.tls else ''}")
        _say(args, f"{gcfg.kind} guest, {format_size(gcfg.memory)}, fill {gcfg.fill} "
                   f"({pair.created_in():.1f} s), workload {gcfg.workload}")
        backend = "" if chk.params.multifd_compression == AUTO else \
            create_method(chk.params.multifd_compression, chk.params.level(), 4096).backend()
        _migrating(args, chk, uri, backend)
        cancel = threading.Event()
        picked: list[str] = []

        def on_info(info: dict[str, Any]) -> None:
            """Say auto's pick once, as the source does in the remote case (the VM's own log is kept away)."""
            auto = info.get("livemig", {}).get("auto")
            if auto and not picked:
                picked.append(auto["method"] if auto.get("level") is None else f"{auto['method']}-{auto['level']}")
                _source_log(f"multifd-compression auto: {picked[0]}, {auto['reason']}")

        with _cancel_on_signals(cancel.set, interrupted), \
                ProgressDisplay(lambda: MigrationStats.from_qapi(pair.info), enabled=not args.quiet):
            result = pair.run(plan, uri, cancel, on_info)
        lm = result.setdefault("livemig", {})
        for note in lm.get("notes", []):
            _source_log(note)
        if "destination" in lm:
            result["destination"] = lm.pop("destination")
        dres: dict[str, Any] = {}
        if result["status"] == "completed":
            dres = pair.destination_info()
            if args.run_after:
                for key, value in pair.workload(args.run_after).items():
                    result.setdefault("destination", {}).setdefault(key, value)
        elif not interrupted:
            dres = pair.destination_info()
        return result, dres, None
    finally:
        pair.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


#: what ``livemig migrate`` says of an unknown outcome: it is one process, so it cannot keep the paused
#: guest for a later explicit resume (as QEMU's postmigrate source VM can); the destination decides
UNKNOWN_ONE_SHOT = ("the source guest was kept paused (postmigrate) and is discarded with this process. The "
                    "destination decides: if its guest runs, the migration completed; if not, the guest is lost, "
                    "as both sides are gone")


def _source_log(message: str) -> None:
    """The source's handover messages; an unknown outcome is said once, by the error (:func:`_raise_failure`)."""
    if message != protocol.UNKNOWN_ADVICE:
        print(f"livemig: {message}", file=sys.stderr, flush=True)


def _raise_failure(result: dict[str, Any], dres: dict[str, Any], terminated: bool) -> None:
    """Raise the failed or cancelled migration, with what was transferred and the guest's state as notes
    (a cancel: KeyboardInterrupt, or :class:`Terminated` when SIGTERM cancelled it)."""
    status, error = result["status"], str(result.get("error-desc", ""))
    ram = result.get("ram", {})
    done = (f"after {result.get('total-time', 0) / 1000:.1f} s, {format_size(ram.get('transferred', 0))} "
            f"transferred; the source guest is {result['livemig']['source-guest']}")
    exc: BaseException
    if status == "cancelled":  # an interrupt after the commit point was answered too late: not a cancel
        exc = Terminated() if terminated else KeyboardInterrupt()
    elif result.get("livemig", {}).get("handover") == "unknown":
        cause = re.fullmatch(r"\((.*)\)", error.removeprefix(protocol.UNKNOWN_ADVICE).strip(), re.S)
        exc = OutcomeUnknown("outcome unknown: the source committed but did not hear the destination resume"
                             + (f" ({cause.group(1)})" if cause else ""))
        exc.add_note(UNKNOWN_ONE_SHOT)
        raise exc
    else:
        exc = MigrationError(f"migration failed: {error}")
        theirs = str(dres.get("error-desc", "")).removeprefix("destination: ")
        if theirs and theirs not in error:
            exc.add_note(f"destination: {theirs}")
    exc.add_note(done)
    raise exc


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser("migrate", help="migrate a guest to a destination (source side)",
                       description="Start a guest and migrate it live to `livemig incoming` at URI. Progress on "
                                   "stderr, the result (statistics table, or --json) on stdout. Exit status: 0 "
                                   "completed, 1 failed, 2 bad option, 3 outcome unknown (the destination never "
                                   "answered the commit: it decides, check it), 130 interrupted (Ctrl-C), 143 "
                                   "terminated (SIGTERM); after 1, 130 or 143 the source guest was running again "
                                   "when the command ended.")
    m.add_argument("uri", nargs="?", help=f"destination: {URI_FORMS}")
    m.add_argument("--local", action="store_true",
                   help="run the guest and its destination here as two `livemig vm` processes, driven over QMP, "
                        "migrating over a free loopback port (no URI)")
    m.add_argument("--run-before", type=float, default=0.0, metavar="S",
                   help="let the guest run S seconds before migrating")
    m.add_argument("--run-after", type=float, default=0.0, metavar="S",
                   help="with --local: let the migrated guest run S seconds and report its progress and "
                        "workload check")
    m.add_argument("--quiet", action="store_true", help="no progress display (the result is still printed)")
    m.add_argument("--on-unknown", choices=["pause"], default="pause",
                   help="when the destination's answer to the commit never comes, keep the guest paused "
                        "(postmigrate), never resumed here, and exit with status 3: the guest is then discarded "
                        "with this process and the destination decides (the only choice, the default)")
    add_guest_options(m, "migrate")
    _add_params(m, source=True)
    add_tls_options(m, source=True)
    from .filecli import add_file_options
    add_file_options(m)
    add_peer_options(m)
    m.set_defaults(func=cmd_migrate)

    i = sub.add_parser("incoming", help="wait for a migration (destination side)",
                       description="Listen at URI, receive a migration, resume the guest. From a QEMU source "
                                   "(recognised by its machine type; give no --memory: the RAM blocks are "
                                   "QEMU's) only RAM is received: no guest is started, its device sections are "
                                   "listed as not applied, --dump-ram DIR writes one file per block. Exit "
                                   "status: 0 completed (QEMU: RAM received), 1 failed, 2 bad option, 130 "
                                   "interrupted (Ctrl-C), 143 terminated (SIGTERM).")
    i.add_argument("uri", help=f"where to listen: {URI_FORMS}; HOST empty or 0 = every address, PORT 0 = any "
                                "free port")
    i.add_argument("--port-file", help="write the listening port to this file once ready")
    i.add_argument("--run-after", type=float, default=0.0, metavar="S",
                   help="after resuming, let the guest run S seconds and report its progress and workload check")
    i.add_argument("--max-memory", metavar="SIZE",
                   help="without --memory: refuse a source guest larger than SIZE before allocating anything "
                        "(default: what the host can give, MemAvailable minus a margin)")
    add_guest_options(i, "incoming")
    _add_params(i, source=False)
    add_tls_options(i, source=False)
    from .incoming_cmd import cmd_incoming
    i.set_defaults(func=cmd_incoming)
