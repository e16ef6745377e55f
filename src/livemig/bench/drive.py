"""The one QMP driver of a migration between two VM processes (QEMU's or ``livemig vm``), each with a
QMP socket, the destination started with ``-incoming defer``: ``livemig bench`` (both engines) and
``livemig migrate --local`` drive their peers with it.

:class:`Peers` does the steps: :meth:`~Peers.configure` sets the capabilities and parameters on
both sides (and the TLS objects), :meth:`~Peers.listen` sends ``migrate-incoming`` to the
destination and reads back where it listens, :meth:`~Peers.migrate` sends ``migrate`` to the
source, :meth:`~Peers.await_final` awaits a ``MIGRATION`` event with a final status
(``query-migrate`` is also asked every :data:`RECHECK_S`, so a lost event costs at most that; a
cancel request becomes ``migrate_cancel``; with capability ``postcopy-ram`` a :class:`PostcopySwitch`
sends ``migrate-start-postcopy`` after the plan's precopy pass). :func:`drive` is the bench's whole run: each side's
final ``query-migrate`` as its statistics, send/recv CPU seconds from /proc/<pid>/stat, the loopback
bytes from the bench's private network namespace.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import MigrationError
from .model import BenchError, not_finished
from .procs import NetNamespace, stop
from .qmpconn import QmpConnection

#: max-bandwidth for "uncapped" (bytes/s): far above anything a host can move
UNCAPPED = 1 << 40
FINAL = ("completed", "failed", "cancelled")
#: seconds between ``query-migrate`` checks while awaiting the final MIGRATION event
RECHECK_S = 0.5


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Plan:
    """What :func:`drive` sets: ``params`` on both sides, ``source_params`` on the source only."""

    method: str
    channels: int
    level: int
    bandwidth: int  # bytes/s, 0 = uncapped
    downtime_limit: int | None
    uri: str
    timeout: float
    settle_s: float = 0.0  # seconds the source guest runs before ``migrate``
    capabilities: tuple[str, ...] = ("multifd", "events")
    #: a tls-creds-x509 directory with both ends' files: object-add on each side, tls-creds set
    tls_dir: str | None = None
    tls_verify_peer: bool = True
    #: the source's tls-hostname ("" = the URI's host)
    tls_hostname: str = ""
    #: more parameters for both sides / for the source only (QEMU's names), set after the others
    more: dict[str, Any] = field(default_factory=dict)
    source_more: dict[str, Any] = field(default_factory=dict)
    #: migrate-incoming's exit-on-error (QEMU 9.1+); None = not sent (QEMU's default: exit)
    exit_on_error: bool | None = None
    #: with capability postcopy-ram: ``migrate-start-postcopy`` once precopy pass N runs
    #: (:class:`PostcopySwitch`); None = never sent by the driver
    postcopy_after_passes: int | None = None

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"multifd-channels": self.channels, "multifd-compression": self.method}
        if self.method in ("zlib", "zstd", "qatzip"):
            p[f"multifd-{self.method}-level"] = self.level
        return p | self.more

    def source_params(self) -> dict[str, Any]:
        sp: dict[str, Any] = {"max-bandwidth": self.bandwidth if self.bandwidth > 0 else UNCAPPED}
        if self.downtime_limit is not None:
            sp["downtime-limit"] = self.downtime_limit
        return sp | self.source_more


@dataclass
class Driven:
    """What one driven migration reported: both sides' final ``query-migrate``, CPU seconds spent
    by each process during the migration, wall seconds, loopback payload bytes (None outside a
    namespace), and the QMP commands sent (``log``, name and arguments, in order)."""

    info: dict[str, Any]
    dinfo: dict[str, Any]
    src_cpu_s: float
    dst_cpu_s: float
    wall_s: float
    socket_bytes: int | None
    source_status_before: Any
    dst_vm_status: Any
    log: list[str] = field(default_factory=list)


class _Logged:
    def __init__(self, conn: QmpConnection, side: str, log: list[str]) -> None:
        self.conn, self.side, self.log = conn, side, log

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command != "query-migrate" or not self.log or self.log[-1] != f"{self.side}: query-migrate":
            self.log.append(f"{self.side}: {command}" + (f" {arguments}" if arguments else ""))
        return self.conn.execute(command, arguments)

    def await_final(self, deadline: float, on_info: Callable[[dict[str, Any]], None] | None = None,
                    cancel: threading.Event | None = None, switch: PostcopySwitch | None = None) -> dict[str, Any]:
        """``query-migrate`` once a MIGRATION event with a final status arrived (or a check found
        one); the last, unfinished, info when ``deadline`` (monotonic s) passes first. Every info
        goes to ``on_info``; once ``cancel`` is set, ``migrate_cancel`` is sent (once); every event
        and info also go to ``switch``, which sends ``migrate-start-postcopy`` when its pass came."""
        info: dict[str, Any] = {}
        cancelled = False
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set() and not cancelled:
                cancelled = True
                try:
                    self.execute("migrate_cancel")
                except MigrationError as exc:  # in post-copy: neither side can go back, so it runs on
                    self.log.append(f"{self.side}: migrate_cancel refused: {exc}")
            ev = self.conn.next_event(min(RECHECK_S, max(0.0, deadline - time.monotonic())))
            if ev is not None and switch is not None:
                switch.seen(ev.get("event"), ev.get("data") or {})
            if ev is not None:
                status = (ev.get("data") or {}).get("status")
                if ev.get("event") != "MIGRATION" or status not in FINAL:
                    continue
                self.log.append(f"{self.side}: event MIGRATION {status}")
            info = self.execute("query-migrate")
            if switch is not None:
                switch.seen("query-migrate", info)
            if on_info is not None:
                on_info(info)
            if info.get("status") in FINAL:
                return info
        return info


class PostcopySwitch:
    """Sends the source ``migrate-start-postcopy`` once, when precopy pass ``after`` (1 = the first
    full copy) is under way: a ``MIGRATION_PASS`` event with that pass number, or a
    ``query-migrate`` whose ``ram.dirty-sync-count`` reached it (a missed event costs one check).
    The source switches once that pass is done (QEMU: as soon as it can); a migration that
    converges first completes as precopy."""

    def __init__(self, src: _Logged, after: int) -> None:
        self.src, self.after = src, after
        #: the pass during which the switch was asked (None: not yet)
        self.sent_in: int | None = None

    def seen(self, kind: str | None, data: dict[str, Any]) -> None:
        """An event (its name and data) or a query-migrate answer (``kind`` "query-migrate")."""
        if self.sent_in is not None:
            return
        if kind == "MIGRATION_PASS":
            npass = int(data.get("pass", 0))
        elif kind == "query-migrate" and data.get("status") == "active":
            npass = int(data.get("ram", {}).get("dirty-sync-count", 0))
        else:
            return
        if npass >= self.after:
            self.sent_in = npass
            self.src.execute("migrate-start-postcopy")


class Peers:
    """A source and a destination VM, each behind a QMP connection; ``log`` lists the commands sent
    (``side: name arguments``, in order)."""

    def __init__(self, src_conn: QmpConnection, dst_conn: QmpConnection) -> None:
        self.log: list[str] = []
        self.src, self.dst = _Logged(src_conn, "source", self.log), _Logged(dst_conn, "destination", self.log)

    def configure(self, plan: Plan) -> None:
        """Capabilities and parameters on both sides (TLS: object-add ``tls0`` on each first)."""
        caps = {"capabilities": [{"capability": c, "state": True} for c in plan.capabilities]}
        for c, endpoint in ((self.dst, "server"), (self.src, "client")):
            c.execute("migrate-set-capabilities", caps)
            params = plan.params()
            if plan.tls_dir:
                obj: dict[str, Any] = {"qom-type": "tls-creds-x509", "id": "tls0", "dir": plan.tls_dir,
                                       "endpoint": endpoint}
                if not plan.tls_verify_peer:
                    obj["verify-peer"] = False
                c.execute("object-add", obj)
                params["tls-creds"] = "tls0"
                if endpoint == "client" and plan.tls_hostname:
                    params["tls-hostname"] = plan.tls_hostname
            c.execute("migrate-set-parameters", params)
        self.src.execute("migrate-set-parameters", plan.source_params())

    def listen(self, plan: Plan) -> str:
        """``migrate-incoming`` at ``plan.uri``; the URI the destination listens on (a ``tcp:`` port 0
        replaced by the port its ``query-migrate`` ``socket-address`` reports)."""
        args: dict[str, Any] = {"uri": plan.uri}
        if plan.exit_on_error is not None:
            args["exit-on-error"] = plan.exit_on_error
        self.dst.execute("migrate-incoming", args)
        if not (plan.uri.startswith("tcp:") and plan.uri.endswith(":0")):
            return plan.uri
        for addr in self.dst.execute("query-migrate").get("socket-address", []):
            if addr.get("type") == "inet" and str(addr.get("port", "0")) != "0":
                return f"{plan.uri[:-2]}:{addr['port']}"
        raise MigrationError(f"the destination listens at {plan.uri} but its query-migrate names no port")

    def migrate(self, uri: str) -> None:
        self.src.execute("migrate", {"uri": uri})


def drive(src_conn: QmpConnection, dst_conn: QmpConnection, src_pid: int, dst_pid: int, plan: Plan,
          netns: NetNamespace | None) -> Driven:
    """Run one migration over QMP (see the module docstring). Raises BenchError (a QMP command
    failed, or no final status within ``plan.timeout`` s: the migration is cancelled first)."""
    peers = Peers(src_conn, dst_conn)
    src, dst = peers.src, peers.dst
    peers.configure(plan)
    uri = peers.listen(plan)
    time.sleep(plan.settle_s)
    before = src.execute("query-status")
    lo0 = netns.lo_counters() if netns else None
    cpu0 = (cpu_seconds(src_pid), cpu_seconds(dst_pid))
    t0 = time.monotonic()
    peers.migrate(uri)
    deadline = t0 + plan.timeout
    switch = None if plan.postcopy_after_passes is None else PostcopySwitch(src, plan.postcopy_after_passes)
    info = src.await_final(deadline, switch=switch)
    if info.get("status") not in FINAL:
        with contextlib.suppress(MigrationError):  # refused in post-copy: the VMs are quit next either way
            src.execute("migrate_cancel")
        raise BenchError(not_finished(plan.timeout, info))
    # QEMU 7.2 sets "completed" before migration_calculate_complete() fills total-time, downtime
    # and the whole-migration mbps: poll until they are there
    settle = time.monotonic() + 5.0
    while info.get("status") == "completed" and not info.get("total-time"):
        if time.monotonic() > settle:
            raise BenchError(f"completed but no total-time reported: {info}")
        time.sleep(0.005)
        info = src.execute("query-migrate")
    src_cpu = cpu_seconds(src_pid)
    dinfo = dst.await_final(deadline) if info.get("status") == "completed" else dst.execute("query-migrate")
    dst_cpu = cpu_seconds(dst_pid)
    lo1 = netns.lo_counters() if netns else None
    wall = time.monotonic() - t0
    socket_bytes = NetNamespace.payload(lo0, lo1) if lo0 is not None and lo1 is not None else None
    return Driven(info, dinfo, src_cpu - cpu0[0], dst_cpu - cpu0[1], wall, socket_bytes, before,
                  dst.execute("query-status"), peers.log)


def quit_all(clients: list[QmpConnection], procs: list[subprocess.Popen[Any]], logs: list[IO[str]]) -> None:
    """``quit`` every VM over QMP, disconnect, give each process 5 s to exit, then stop whatever is
    left (process group and descendants) and close the log files."""
    for c in clients:
        with contextlib.suppress(MigrationError):
            c.execute("quit")
        c.close()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stop(p)
    for p in procs:
        stop(p)
    for log in logs:
        log.close()
