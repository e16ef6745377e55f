"""``livemig incoming``: listen, receive one migration, resume the guest (or, from a QEMU source,
land its RAM without starting a guest). Options and checks: :mod:`.cli`; the engine:
:class:`.destination.Destination`; exit statuses as ``livemig migrate``'s (README, "Exit status")."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from ..errors import MigrationError
from ..guest import create_guest
from ..guest.kvm.runner import install_kick_handler
from ..transport.secure import tls_listener
from ..ui.errors import Terminated
from ..units import format_size
from . import from_qemu
from .cli import _write_json, check_incoming, destination_summary
from .destination import Destination
from .local import die_with_parent
from .postcopyopts import recover_when_paused
from .tlsopts import is_loopback


def cmd_incoming(args: argparse.Namespace) -> int:
    die_with_parent()  # started by migrate --local: end with it
    if args.uri.startswith("file:"):  # mapped-ram files: migration/filecli.py
        from .filecli import cmd_incoming_file
        return cmd_incoming_file(args)
    chk = check_incoming(args)
    assert chk.address is not None
    guest = None
    discarded: list[str] = []  # the handover discarded the guest (said once, with the failure)
    if chk.guest is None:
        # the guest is created from the source's config on a connection thread: a KVM one needs the
        # SIGUSR1 handler that pauses its vCPUs, which only the main thread can install
        install_kick_handler()
    else:
        t0 = time.monotonic()
        guest = create_guest(chk.guest, incoming=True)
        print(f"livemig incoming: {chk.guest.kind} guest, {format_size(chk.guest.memory)} prefaulted in "
              f"{time.monotonic() - t0:.1f} s", file=sys.stderr)
    try:
        listener = tls_listener(chk.address, chk.tls, chk.params.multifd_channels)
        dst = Destination(listener, chk.params, guest=guest, uuid=chk.uuid, timeout=args.timeout,
                          run_after=args.run_after, dump_ram=args.dump_ram, full_verify=args.full_verify,
                          max_memory=chk.max_memory, postcopy_ram=args.postcopy_ram,
                          log=_destination_log(discarded))
    except BaseException:
        if guest is not None:
            guest.close()
        raise
    stopped: list[str] = []

    def stop(reason: str) -> None:
        stopped.append(reason)  # fail from a thread: the handler may run while this thread holds a lock
        threading.Thread(target=dst.fail, args=(MigrationError(reason), "destination"), daemon=True).start()

    old_int = signal.signal(signal.SIGINT, lambda *_: stop("interrupted"))
    old_term = signal.signal(signal.SIGTERM, lambda *_: stop("terminated"))
    try:
        if args.port_file:
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(dst.port))
            os.replace(tmp, args.port_file)
        where = chk.address.with_port(dst.port)
        print(f"livemig incoming: listening on {where}{' (TLS)' if chk.tls else ''}", file=sys.stderr, flush=True)
        if chk.tls is None and not is_loopback(chk.address):
            print(f"livemig incoming: warning: listening on {where} without TLS: anyone who can reach this port "
                  "can put a guest here; use --tls-creds (README, \"Trust\")", file=sys.stderr, flush=True)
        finished = threading.Event()
        if args.postcopy_ram:
            recover_when_paused(dst, chk.address, chk.tls, lambda text: print(f"livemig incoming: {text}",
                                                                               file=sys.stderr, flush=True), finished)
        try:
            result = dst.run()
        finally:
            finished.set()
        signal.signal(signal.SIGINT, old_int)
        _write_json(args.json, result)
        if result.get("status") != "completed":
            exc: BaseException
            if stopped and stopped[0] in ("interrupted", "terminated"):
                exc = Terminated() if stopped[0] == "terminated" else KeyboardInterrupt()
            else:
                exc = MigrationError(f"migration failed: {_unprefixed(str(result.get('error-desc')))}")
            if discarded:
                exc.add_note("guest discarded, never run")
            elif dst.postcopy is not None and dst.postcopy.ran:
                exc.add_note("the guest ran here in post-copy and is lost: neither side holds all of its RAM")
            raise exc
        if result.get("source") == "qemu":
            for line in from_qemu.summary(result).splitlines():
                print(f"livemig incoming: {line}", file=sys.stderr)
            return 0
        workload = dst.guest.config.workload if dst.guest is not None else "idle"
        summary = destination_summary(result, workload).removeprefix("destination: ")
        print(f"livemig incoming: completed; {summary}", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        if dst.postcopy is not None:
            dst.postcopy.close()  # wakes vCPUs waiting on pages that will not come, so the guest can close
        if dst.guest is not None:
            dst.guest.close()


def _unprefixed(text: str) -> str:
    """A destination reason without its ``destination:`` context: ``livemig incoming`` is the destination."""
    return text.removeprefix("destination: ")


def _destination_log(discarded: list[str]) -> Any:
    """The destination's log for ``livemig incoming``: its own messages without a ``destination:`` context;
    the handover's "guest discarded" line held back (appended to ``discarded``): the failure that caused it
    is printed once, as the error, with the discard as its note."""
    def log(message: str) -> None:
        if message.startswith(DISCARDED):
            discarded.append(_unprefixed(message.removeprefix(DISCARDED)))
            return
        print(f"livemig incoming: {_unprefixed(message)}", file=sys.stderr, flush=True)
    return log


#: how the destination's handover says it discarded the guest (migration/handover.py)
DISCARDED = "guest discarded, never run: "
