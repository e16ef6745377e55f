"""``livemig migrate file:PATH --mapped-ram`` and ``livemig incoming file:PATH``: mapped-ram files
(QEMU's format, docs/mapped-ram.md), hooked into :mod:`.cli` for URIs that start with ``file:``.

Options are checked before a guest is created; failures are raised and rendered once by
:func:`livemig.ui.errors.report_error`, as for the other URIs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any, TextIO

from ..errors import MigrationError, ParameterError
from ..guest import create_guest
from ..params import parse_option
from ..ui.errors import Terminated
from ..ui.progress import ProgressDisplay
from ..units import format_size, plural
from .cli import _check_common, _check_seconds, _write_json, destination_summary
from .guestopts import guest_config_from_args
from .mapped_file import FileSave
from .mapped_load import FileLoad

SCHEME = "file:"


def is_file_uri(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(SCHEME)


def add_file_options(p: argparse.ArgumentParser) -> None:
    """``livemig migrate``'s options for a ``file:`` URI."""
    g = p.add_argument_group("file: migration (QEMU's mapped-ram format)")
    g.add_argument("--mapped-ram", action="store_true",
                   help="with file:PATH: write QEMU's mapped-ram format (pages at fixed offsets, sparse; the only "
                        "file format livemig writes, so required with file:)")
    g.add_argument("--machine-type", metavar="TYPE",
                   help="with file:PATH: write a file for QEMU, whose machine type this is (pc-q35-10.0; QEMU's "
                        "`query-machines`), holding RAM only; without it the file is a livemig snapshot")
    g.add_argument("--ramblock", default="pc.ram", metavar="ID",
                   help="with --machine-type: the QEMU RAM block the guest's RAM goes to, of the same size "
                        "(`info ramblock`; default pc.ram, the id of q35's RAM without a memory backend)")


def _path(uri: str, option: str, must_exist: bool) -> str:
    path = uri[len(SCHEME):]
    if not path:
        raise ParameterError(f"{option} '{uri}': expected file:PATH")
    if must_exist and not os.path.exists(path):
        raise ParameterError(f"{option} '{uri}': {path} does not exist")
    if must_exist and not os.path.isfile(path):
        raise ParameterError(f"{option} '{uri}': {path} is not a file")
    if not must_exist and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
        raise ParameterError(f"{option} '{uri}': expected a file in an existing directory")
    return path


def _refuse_tls(args: argparse.Namespace) -> None:
    if getattr(args, "tls_creds", None):
        raise ParameterError(f"--tls-creds {args.tls_creds}: not with a file: URI (QEMU: mapped-ram is "
                             "incompatible with TLS; the file is written locally)")


def cmd_migrate_file(args: argparse.Namespace) -> int:
    """``livemig migrate file:PATH --mapped-ram``: save the running guest; it stays paused after."""
    _check_seconds(args)
    if args.local:
        raise ParameterError(f"--local starts its own destination, so the URI '{args.uri}' would be ignored: "
                             "give one or the other")
    if args.run_after:
        raise ParameterError("--run-after needs --local (to run the saved guest: livemig incoming file:PATH "
                             "--run-after S)")
    if not args.mapped_ram:
        raise ParameterError(f"'{args.uri}': a file: migration needs --mapped-ram (QEMU's file format for "
                             "multifd, the one livemig writes)")
    path = _path(args.uri, "destination", must_exist=False)
    _refuse_tls(args)
    params, _ = _check_common(args)
    if params.multifd_compression != "none":
        raise ParameterError(f"--multifd-compression {params.multifd_compression}: a mapped-ram file holds raw "
                             "pages (QEMU: mapped-ram is incompatible with compression); use none")
    gcfg = guest_config_from_args(args)
    guest = create_guest(gcfg)
    try:
        guest.start()
        if args.run_before:
            time.sleep(args.run_before)
        save = FileSave(guest, path, params, machine_type=args.machine_type, ramblock=args.ramblock,
                        dump_ram=args.dump_ram)
        what = f"a file for QEMU ({args.machine_type}, RAM block {args.ramblock})" if args.machine_type \
            else "a livemig snapshot"
        if not args.quiet:
            print(f"livemig: saving the {gcfg.kind} guest ({format_size(gcfg.memory)}) to {path}, {what}, on "
                  f"{plural(params.multifd_channels, 'channel')}", file=sys.stderr, flush=True)
        stats = _run_cancellable(save, args.quiet)
        result = stats.to_qapi()
        _write_json(args.json, result)
        if stats.status != "completed":
            if stats.status == "cancelled":
                raise KeyboardInterrupt
            exc = MigrationError(f"migration failed: {stats.error}")
            exc.add_note(f"{path} removed; the guest is {stats.source_guest}")
            raise exc
        out: TextIO = sys.stderr if args.json == "-" else sys.stdout
        print(stats.table(), file=out)
        size = os.stat(path)
        print(f"file: {path}, {format_size(size.st_size)} long, {format_size(size.st_blocks * 512)} on disk; "
              f"the guest stays paused (postmigrate)", file=out)
        return 0
    finally:
        guest.close()


def _run_cancellable(save: FileSave, quiet: bool) -> Any:
    interrupted: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        interrupted.append(signum)
        threading.Thread(target=save.cancel, name="cancel", daemon=True).start()

    old = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        with ProgressDisplay(lambda: save.stats, enabled=not quiet):
            stats = save.run()
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
    if signal.SIGTERM in interrupted and stats.status == "cancelled":
        raise Terminated()
    return stats


def cmd_incoming_file(args: argparse.Namespace) -> int:
    """``livemig incoming file:PATH``: restore a livemig snapshot, or read QEMU's RAM from its file."""
    _check_seconds(args)
    path = _path(args.uri, "incoming", must_exist=True)
    _refuse_tls(args)
    params, _ = _check_common(args)
    max_memory = parse_option("--max-memory", args.max_memory, "size") if args.max_memory else None
    load = FileLoad(path, params, guest_config=guest_config_from_args(args) if args.memory else None,
                    run_after=args.run_after, dump_ram=args.dump_ram, max_memory=max_memory,
                    log=lambda m: print(f"livemig incoming: {m}", file=sys.stderr, flush=True))
    try:
        try:
            result = load.run()
        except MigrationError as exc:
            _write_json(args.json, {"status": "failed", "error-desc": str(exc)})
            raise MigrationError(f"{path}: {exc}") from exc
        _write_json(args.json, result)
        say = f"livemig incoming: read {path} ({result['kind']} file, machine {result['machine-type']}): " \
              f"{plural(len(result['blocks']), 'RAM block')}, {result['pages']} pages in {result['read-ms']} ms"
        print(say + (f", RAM written to {args.dump_ram}" if args.dump_ram else ""), file=sys.stderr)
        if result["kind"] == "livemig":
            workload = load.guest.config.workload if load.guest is not None else "idle"
            print(f"livemig incoming: completed; {destination_summary(result, workload).removeprefix('destination: ')}",
                  file=sys.stderr)
        else:
            devices = result["devices-not-applied"]
            print(f"livemig incoming: not applied: QEMU's CPU and device state ({len(devices)} sections: "
                  f"{', '.join(devices[:8])}{', ...' if len(devices) > 8 else ''}); livemig's guest cannot run "
                  "QEMU's machine, so no guest was resumed", file=sys.stderr)
        return 0
    finally:
        load.close()
