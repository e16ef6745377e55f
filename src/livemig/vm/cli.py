"""``livemig vm``: livemig's ``qemu-system-x86_64``. A guest that runs until ``quit`` or SIGTERM,
with QMP (``--qmp``) and HMP (``--monitor``) monitors served throughout, as a migration source or,
with ``--incoming``, as a destination.

Monitor options take QEMU's syntax: ``--qmp unix:PATH,server=on,wait=off``, ``--qmp
tcp:HOST:PORT,server=on,wait=off`` (several allowed), ``--monitor stdio``, ``--monitor unix:PATH``.
Only server mode exists (``server=off`` is refused). ``wait=on`` (QEMU's default when ``server=on``
is given; ``nowait`` = ``wait=off``) holds the guest, stopped, until a client connected to that
monitor, as QEMU waits before the VM starts; a bare ``unix:PATH`` listens without waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

from ..errors import MigrationError, ParameterError
from ..guest import create_guest
from ..migration.cli import MIN_TIMEOUT
from ..migration.guestopts import add_guest_options, guest_config_from_args
from ..migration.local import die_with_parent
from ..monitor import CommandTable, version_info
from ..monitor.hmp import HMP
from ..monitor.schema import QMPError
from ..monitor.server import QMPServer
from ..monitor.terminal import HMPMonitors
from ..params import check_option
from ..transport.address import parse_address
from . import commands
from .machine import VM

#: what HMP's migrate prints when its monitor cannot wait (HMP through QMP), as QEMU's hmp_migrate
NO_SYNC_MIGRATE = "terminal does not allow synchronous migration, continuing detached\n"


@dataclass(frozen=True)
class MonitorSpec:
    """One --qmp/--monitor option: ``kind`` unix, tcp or stdio; ``path`` or ``host``/``port``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0
    #: the guest starts only once a client connected here (QEMU's wait=on)
    wait: bool = False


def parse_monitor(option: str, text: str, stdio_ok: bool) -> MonitorSpec:
    """Parse QEMU's chardev shorthand: stdio or unix for HMP (``stdio_ok``), unix or tcp for QMP.

    Raises ParameterError naming the option and what was wrong."""
    where, *opts = text.split(",")
    server = wait = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "server" and value in ("", "on"):
            server = True
            continue
        if key == "wait" and value in ("on", "off") or key == "nowait":
            wait = key == "wait" and value == "on"
            continue
        if key == "server" and value == "off":
            raise ParameterError(f"{option} {text}: only server=on is supported (livemig listens, never connects)")
        raise ParameterError(f"{option} {text}: unknown option '{opt}' (known: server=on, wait=on|off)")
    waits = bool(server) if wait is None else wait
    if where == "stdio" and stdio_ok:
        return MonitorSpec("stdio")
    if where.startswith("unix:") and len(where) > 5:
        return MonitorSpec("unix", path=where[5:], wait=waits)
    if where.startswith("tcp:") and not stdio_ok:
        address = parse_address(where)
        return MonitorSpec("tcp", host=address.host, port=address.port, wait=waits)
    expected = "stdio or unix:PATH" if stdio_ok else "unix:PATH or tcp:HOST:PORT"
    raise ParameterError(f"{option} {text}: expected {expected}")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm", help="run a VM driven through QMP/HMP monitors, as qemu-system-x86_64",
                       description="Run a guest until 'quit' or SIGTERM, serving QMP and HMP monitors; "
                                   "migrate it with the monitor commands (migrate, migrate-incoming, ...).")
    add_guest_options(p, "vm")
    p.add_argument("--qmp", action="append", default=[], metavar="SPEC",
                   help="QMP monitor: unix:PATH[,server=on,wait=off] or tcp:HOST:PORT[,...] (repeatable)")
    p.add_argument("--monitor", action="append", default=[], metavar="SPEC",
                   help="HMP monitor: stdio or unix:PATH (repeatable)")
    p.add_argument("--incoming", metavar="URI", help="wait for a migration at tcp:HOST:PORT or unix:PATH, or "
                                                     "restore a livemig mapped-ram snapshot from file:PATH; "
                                                     "'defer' = wait for migrate-incoming")
    p.add_argument("-S", "--paused", action="store_true", help="do not start the guest (prelaunch); 'cont' does")
    p.add_argument("--name", default="", help="VM name (query-name)")
    p.add_argument("--uuid", default="", help="VM UUID, checked in every multifd handshake")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help=f"seconds without progress before a migration fails ({MIN_TIMEOUT:g} or more, "
                        "default 30)")
    p.add_argument("--full-verify", action="store_true",
                   help="every migration hashes all of RAM at switchover (also catches writes the dirty log "
                        "missed; adds downtime)")
    p.add_argument("--dump-ram", metavar="DIR", help="write RAM at switchover into DIR (for tests)")
    p.set_defaults(func=cmd_vm)


def _uuid(text: str) -> bytes:
    import uuid

    try:
        return uuid.UUID(text).bytes if text else bytes(16)
    except ValueError:
        raise ParameterError(f"--uuid {text}: expected a UUID like 123e4567-e89b-12d3-a456-426614174000") from None


def cmd_vm(args: argparse.Namespace) -> int:
    die_with_parent()  # started by migrate --local: end with it
    qmp = [parse_monitor("--qmp", s, stdio_ok=False) for s in args.qmp]
    hmp = [parse_monitor("--monitor", s, stdio_ok=True) for s in args.monitor]
    if args.incoming and args.incoming != "defer" and not args.incoming.startswith("file:"):
        parse_address(args.incoming)
    uuid = _uuid(args.uuid)
    check_option("--timeout", args.timeout, minimum=MIN_TIMEOUT, what="a number of seconds")
    gcfg = guest_config_from_args(args)
    guest = create_guest(gcfg, incoming=bool(args.incoming))
    vm = VM(guest, name=args.name, paused=args.paused, incoming=bool(args.incoming), uuid=uuid, timeout=args.timeout,
            full_verify=args.full_verify, dump_ram=args.dump_ram, hold=any(m.wait for m in qmp + hmp))
    try:
        return asyncio.run(_serve(vm, qmp, hmp, args.incoming))
    finally:
        vm.close()


async def _serve(vm: VM, qmp: list[MonitorSpec], hmp_specs: list[MonitorSpec], incoming: str | None) -> int:
    loop = asyncio.get_running_loop()
    table = CommandTable()
    server = QMPServer(table, version_info())
    hmp = HMP(table)
    monitors = HMPMonitors(hmp, server.lock, f"livemig {version_info()['package'][8:]} monitor - "
                                             "type 'help' for more information")
    stopping = asyncio.Event()
    outcome: dict[str, str | int] = {"reason": "", "code": 0}

    def request_stop(reason: str, code: int) -> None:
        if not stopping.is_set():
            outcome.update(reason=reason, code=code)
            stopping.set()

    def on_quit(reason: str, code: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the VM is quitting anyway
            loop.call_soon_threadsafe(request_stop, reason, code)

    def hmp_line(line: str) -> str:
        result = hmp.run(line)
        return result.output + (NO_SYNC_MIGRATE if result.wait else "")

    vm.emit = server.emit
    vm.on_quit = on_quit
    commands.register(table, vm, hmp_line)
    waits: list[tuple[MonitorSpec, asyncio.Event]] = []
    try:
        for spec in qmp:
            if spec.kind == "unix":
                first = await server.listen_unix(spec.path)
            else:
                first = (await server.listen_tcp(spec.host, spec.port))[1]
            waits.append((spec, first))
        for spec in hmp_specs:
            if spec.kind == "stdio":
                monitors.start_stdio()
            else:
                waits.append((spec, await monitors.listen_unix(spec.path)))
    except OSError as exc:
        raise MigrationError(f"cannot open a monitor socket: {exc}") from exc
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, request_stop, "host-signal", 0)
    for spec, first in waits:
        if spec.wait and not first.is_set() and not stopping.is_set():
            where = spec.path or f"{spec.host}:{spec.port}"
            print(f"livemig vm: waiting for a connection on {spec.kind}:{where} (wait=on)", file=sys.stderr,
                  flush=True)
            pending = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(stopping.wait())}
            _, left = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in left:
                task.cancel()
    if not stopping.is_set():
        vm.launch()
    if incoming and incoming != "defer" and not stopping.is_set():
        try:
            await asyncio.to_thread(vm.migrate_incoming, incoming)
        except QMPError as exc:
            raise MigrationError(f"--incoming {incoming}: {exc.desc}") from exc
    await stopping.wait()
    async with server.lock:  # an answer being written (quit's own) goes out before SHUTDOWN
        if outcome["code"]:
            print(f"livemig vm: {outcome['reason']}", file=sys.stderr)
        else:
            server.emit("SHUTDOWN", {"guest": False, "reason": str(outcome["reason"])})
        if outcome["reason"] == "host-signal":
            print("livemig vm: terminating on signal", file=sys.stderr)
        await monitors.close()
        await server.close()
    return int(outcome["code"])
