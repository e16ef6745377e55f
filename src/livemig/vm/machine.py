"""The VM behind the monitor commands: a guest, QEMU's run states, migration capabilities and
parameters, and at most one outgoing and one incoming migration at a time.

Run states are QEMU's RunState names: ``prelaunch`` (started with -S, never run), ``running``,
``paused`` (stop), ``inmigrate`` (waiting for or receiving a migration), ``finish-migrate`` (the
source at switchover), ``postmigrate`` (the source after a completed migration). Refusals use
QEMU's words (migration/migration.c, monitor/qmp-cmds.c). A migration runs
:meth:`livemig.migration.source.Source.run` (or ``Destination.run``) in its own thread; the
monitor stays responsive throughout and ``query-migrate`` reads the live statistics.

Events (through ``emit(name, data)``, from any thread): STOP, RESUME, and, with capability
``events`` on, MIGRATION {status} and MIGRATION_PASS {pass} (pass = dirty-sync count, as QEMU).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import MigrationError
from ..guest import Guest
from ..migration.destination import Destination
from ..migration.mapped_load import FileLoad
from ..migration.source import Source
from ..migration.stats import MigrationStats
from ..monitor.schema import QMPError
from ..params import MigrationParameters
from ..transport.address import Address, parse_address
from ..transport.secure import tls_connector, tls_listener
from .tlsobjects import TLS_PARAMETERS, TlsObjects

#: what the first ``cont`` after an unknown handover outcome answers (a second one resumes the guest)
UNKNOWN_CONT = ("The migration's outcome is unknown: this source committed the handover but never heard the "
                "destination resume, so the guest may run there. Check the destination first (query-status): "
                "if its guest runs, the migration completed and this guest must stay stopped (quit this VM). "
                "Only if the destination's guest does not run and never will (quit it first), send 'cont' "
                "again to resume the guest here")

#: capability -> default. livemig moves RAM over multifd channels with a return path only, so those
#: two default on (QEMU: off) and a migration with either turned off is refused.
CAPABILITIES: dict[str, bool] = {"multifd": True, "return-path": True, "events": False,
                                 "pause-before-switchover": False, "auto-converge": False}
REQUIRED_CAPABILITIES = ("multifd", "return-path")
RUNNING_STATUSES = ("setup", "active", "pre-switchover", "device", "cancelling")

Emit = Callable[[str, "dict[str, Any] | None"], None]


def _no_emit(_name: str, _data: dict[str, Any] | None = None) -> None:
    pass


class VM:
    """One virtual machine; every public method is a monitor command's body (QMPError on refusal)."""

    def __init__(self, guest: Guest, *, name: str = "", paused: bool = False, incoming: bool = False,
                 uuid: bytes = bytes(16), timeout: float = 30.0, emit: Emit = _no_emit,
                 on_quit: Callable[[str, int], None] | None = None, full_verify: bool = False,
                 dump_ram: str | None = None, hold: bool = False) -> None:
        self.guest = guest
        #: every migration hashes all of RAM at switchover / writes RAM there into this directory
        self.full_verify = full_verify
        self.dump_ram = dump_ram
        self.name = name
        self.uuid = uuid
        self.timeout = timeout
        self.emit = emit
        self.on_quit = on_quit
        self.params = MigrationParameters()
        #: object-add's TLS objects and the tls-* migration parameters
        self.tls = TlsObjects()
        self.caps = dict(CAPABILITIES)
        self.lock = threading.RLock()
        self.autostart = not paused
        self._started = False
        self.state = "inmigrate" if incoming else "prelaunch" if paused else "running"
        if self.state == "running" and not hold:
            self._start_guest()
        # outgoing
        self.source: Source | None = None
        self._stats: MigrationStats | None = None
        self._user_paused = False
        self._switchover = threading.Event()
        self._waiting_switchover = False
        #: the last migration's handover outcome is unknown (guest in postmigrate); cont was told why not
        self._unknown = False
        self._unknown_told = False
        self._threads: list[threading.Thread] = []
        # incoming
        self.destination: Destination | None = None
        self._incoming_started = False
        self._incoming: dict[str, Any] = {}

    # --- run state -------------------------------------------------------------------------------
    def _start_guest(self) -> None:
        if self._started:
            self.guest.resume()
        else:
            self.guest.start()
            self._started = True

    def launch(self) -> None:
        """Start the guest of a VM created with ``hold`` (a ``wait=on`` monitor got its client)."""
        with self.lock:
            if self.state == "running" and not self._started:
                self._start_guest()

    def query_status(self) -> dict[str, Any]:
        return {"status": self.state, "running": self.state == "running"}

    def stop(self) -> None:
        with self.lock:
            if self.state == "inmigrate":
                self._set_autostart(False)
            elif self.state == "running":
                self.guest.pause()
                self.state = "paused"
                self._user_paused = True
                self.emit("STOP", None)

    def cont(self) -> None:
        """QEMU's qmp_cont: refused in ``finish-migrate``; in ``inmigrate`` the guest runs once the
        migration completes; else the guest runs, ``postmigrate`` included (QEMU resumes a source
        after a completed migration too). After an unknown handover outcome the first ``cont`` is
        refused with what to check (:data:`UNKNOWN_CONT`), and a second one resumes the guest here."""
        with self.lock:
            if self.state == "finish-migrate":
                raise QMPError("Migration is not finalized yet")
            if self.state == "inmigrate":
                self._set_autostart(True)  # as QEMU: run once the incoming migration completes
                return
            if self.state == "running":
                return
            if self.state == "postmigrate" and self._unknown:
                if not self._unknown_told:
                    self._unknown_told = True
                    raise QMPError(UNKNOWN_CONT)
                assert self.source is not None
                self.source.handover.cont()
                self._unknown = False
                if self._stats is not None:
                    self._stats.handover, self._stats.source_guest = self.source.handover.state, "running"
            else:
                self._start_guest()
            self.state = "running"
            self._user_paused = False
            self.emit("RESUME", None)

    def query_workload(self) -> dict[str, Any]:
        """x-query-workload: the guest's workload, its progress counter and its check (``ok`` or what
        is wrong; absent for an idle guest, which has nothing to check). QMPError before the guest ran."""
        with self.lock:
            if not self._started:
                raise QMPError(f"the guest has not run yet (state {self.state})")
            workload = self.guest.config.workload
            out: dict[str, Any] = {"workload": workload, "progress": self.guest.progress()}
            if workload != "idle":
                try:
                    self.guest.check_workload()
                    out["check"] = "ok"
                except MigrationError as exc:
                    out["check"] = str(exc)
            return out

    def _set_autostart(self, on: bool) -> None:
        """Whether the incoming guest runs when its migration completes (-S and stop: no; cont: yes)."""
        self.autostart = on
        if self.destination is not None:
            self.destination.handover.resume_guest = on

    def quit(self, reason: str = "host-qmp-quit") -> None:
        if self.on_quit is not None:
            self.on_quit(reason, 0)

    # --- capabilities and parameters -------------------------------------------------------------
    def migration_active(self) -> bool:
        out = self._stats is not None and self._stats.status in RUNNING_STATUSES
        return out or self._incoming.get("status") in ("setup", "active")

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in self.caps.items()]

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        with self.lock:
            if self.migration_active():
                raise QMPError("There's a migration process in progress")
            for cap in caps:
                self.caps[cap["capability"]] = cap["state"]

    def query_parameters(self) -> dict[str, Any]:
        return self.params.to_qapi() | self.tls.params

    def set_parameters(self, values: dict[str, Any]) -> None:
        """Checked as a whole by MigrationParameters.check(); they apply from the next migration."""
        with self.lock:
            new = copy.copy(self.params)
            for name, value in values.items():
                if name not in TLS_PARAMETERS:
                    setattr(new, name.replace("-", "_"), value)
            try:
                new.check()
            except MigrationError as exc:
                raise QMPError(str(exc)) from exc
            self.params = new
            self.tls.set(values)

    # --- outgoing migration ----------------------------------------------------------------------
    def migrate(self, uri: str, resume: bool = False) -> None:
        with self.lock:
            if resume:
                raise QMPError("Cannot resume if there is no paused migration")
            if self.migration_active():
                raise QMPError("There's a migration process in progress")
            if self.state == "inmigrate":
                raise QMPError("Guest is waiting for an incoming migration")
            if self.state == "postmigrate":
                raise QMPError("Can't migrate the vm that was paused due to previous migration")
            for cap in REQUIRED_CAPABILITIES:
                if not self.caps[cap]:
                    raise QMPError(f"livemig migrates over multifd channels with a return path only: "
                                   f"capability '{cap}' must be on")
            address = _address(uri)
            try:
                connector = tls_connector(address, self.tls.resolve(server=False))
                src = Source(self.guest, connector, copy.copy(self.params), uuid=self.uuid, timeout=self.timeout,
                             full_verify=self.full_verify, dump_ram=self.dump_ram,
                             auto_converge=self.caps["auto-converge"], on_progress=self._on_source_status)
            except MigrationError as exc:
                raise QMPError(str(exc)) from exc
            self.source, self._stats = src, src.stats
            self._unknown = self._unknown_told = False
            self._switchover.clear()
            self._spawn("migration", self._run_source, src)

    def _run_source(self, src: Source) -> None:
        done = threading.Event()
        self._spawn("migration-pass", self._watch_passes, src.stats, done)
        try:
            src.run()
        finally:
            done.set()
        with self.lock:
            if src.stats.status != "completed" and self._user_paused and self.guest.running:
                self.guest.pause()  # a failed migration leaves a stopped guest stopped

    def _watch_passes(self, stats: MigrationStats, done: threading.Event) -> None:
        seen = 0
        while True:
            finished = done.wait(0.02)
            count = stats.dirty_sync_count
            if self.caps["events"]:
                for n in range(seen + 1, count + 1):
                    self.emit("MIGRATION_PASS", {"pass": n})
            seen = max(seen, count)
            if finished:
                return

    def _on_source_status(self, stats: MigrationStats) -> None:
        """The source's status changed (in its migration thread, which waits for this to return).

        ``device``: the guest stops first (run state ``finish-migrate``, STOP), as QEMU's
        migration_completion stops the VM before anything else; with ``pause-before-switchover`` the
        migration then waits in ``pre-switchover``, guest stopped, for ``migrate-continue`` or
        ``migrate_cancel``. ``failed``/``cancelled``: the run state follows the handover's guest state
        (``postmigrate`` after an unknown outcome; else running again, or paused if ``stop`` paused it).
        """
        status = stats.status
        if status == "device":
            with self.lock:
                self.guest.pause()
                self.state = "finish-migrate"
                self.emit("STOP", None)
            if self.caps["pause-before-switchover"]:
                self._migration_event("pre-switchover")
                self._waiting_switchover = True
                while not self._switchover.wait(0.05):
                    if self.source is not None and self.source.status.state != "device":
                        break  # cancelled meanwhile
                self._waiting_switchover = False
        self._migration_event(status)
        with self.lock:
            if status == "completed":
                self.state = "postmigrate"
            elif status in ("failed", "cancelled") and self.state == "finish-migrate":
                self._after_failure()

    def _after_failure(self) -> None:
        guest_state = self.source.handover.guest_state if self.source is not None else "running"
        if guest_state == "postmigrate":  # committed, no answer: stays stopped until the operator acts
            self.state = "postmigrate"
            self._unknown = True
        elif self._user_paused:
            self.guest.pause()
            self.state = "paused"
        else:
            if not self.guest.running:  # stopped here (finish-migrate) before the handover paused it
                self.guest.resume()
            self.state = "running"
            self.emit("RESUME", None)

    def _migration_event(self, status: str) -> None:
        if self.caps["events"]:
            self.emit("MIGRATION", {"status": status})

    def migrate_continue(self, state: str) -> None:
        current = self._current_status()
        if current != state:
            raise QMPError(f"Migration not in expected state: {current}")
        self._switchover.set()

    def migrate_cancel(self) -> None:
        if self.source is not None and self.migration_active():
            self.source.cancel()
            self._switchover.set()

    def _current_status(self) -> str:
        if self._waiting_switchover:
            return "pre-switchover"
        if self._stats is not None:
            return self._stats.status
        return str(self._incoming.get("status", "none"))

    def query_migrate(self) -> dict[str, Any]:
        """QEMU's MigrationInfo: {} before any migration; livemig's own figures under 'livemig'."""
        if self._stats is not None:
            info = self._stats.to_qapi()
            if "destination" in info:
                info["livemig"]["destination"] = info.pop("destination")
            if self._waiting_switchover:
                info["status"] = "pre-switchover"
            return info
        return dict(self._incoming)

    # --- incoming migration ----------------------------------------------------------------------
    def migrate_incoming(self, uri: str, exit_on_error: bool = True) -> None:
        with self.lock:
            if self._incoming_started:
                raise QMPError("The incoming migration has already been started")
            if self.state != "inmigrate":
                raise QMPError("'-incoming' was not specified on the command line")
            if uri.startswith("file:"):
                self._incoming_file(uri.removeprefix("file:"), exit_on_error)
                return
            address = _address(uri)
            try:
                tls = self.tls.resolve(server=True)
                where = address if tls is None else tls_listener(address, tls, self.params.multifd_channels)
                dst = Destination(where, copy.copy(self.params), guest=self.guest, uuid=self.uuid,
                                  timeout=self.timeout, full_verify=self.full_verify, dump_ram=self.dump_ram)
            except MigrationError as exc:
                raise QMPError(str(exc)) from exc
            self._incoming_started = True
            self.destination = dst
            dst.handover.resume_guest = self.autostart  # -S: the guest never runs before cont
            dst.handover.on_resumed = self._taken_over
            self._incoming = {"status": "setup", "socket-address": [_socket_address(address, dst.port)]}
            self._migration_event("setup")
            self._spawn("incoming", self._run_destination, dst, exit_on_error)

    def _run_destination(self, dst: Destination, exit_on_error: bool) -> None:
        t0 = time.monotonic()
        done = threading.Event()
        self._spawn("incoming-watch", self._watch_incoming, dst, done)
        try:
            result = dst.run()
        finally:
            done.set()
        self._incoming_ended(result, t0, exit_on_error)

    def _incoming_file(self, path: str, exit_on_error: bool) -> None:
        """``migrate-incoming file:PATH``: a livemig mapped-ram snapshot restored into this guest
        (docs/mapped-ram.md), which then runs unless -S (or stop) holds it, as after a migration."""
        if not path:
            raise QMPError("file: needs a path (file:PATH)")
        load = FileLoad(path, copy.copy(self.params), guest=self.guest, resume=False)
        self._incoming_started = True
        self._incoming = {"status": "setup"}
        self._migration_event("setup")
        self._spawn("incoming", self._run_file_load, load, exit_on_error)

    def _run_file_load(self, load: FileLoad, exit_on_error: bool) -> None:
        t0 = time.monotonic()
        with self.lock:
            self._incoming["status"] = "active"
            self._migration_event("active")
        try:
            result = load.run()
            if result.get("kind") != "livemig":
                result = {"status": "failed", "error-desc": f"{load.path} is a QEMU snapshot: livemig's guest cannot "
                          "run QEMU's machine (read its RAM with livemig incoming file:PATH --dump-ram DIR)"}
        except MigrationError as exc:
            result = {"status": "failed", "error-desc": str(exc)}
        finally:
            load.close()
        if result.get("status") == "completed":
            with self.lock:
                self._started = True  # loaded: cont resumes it
                if self.autostart:
                    self.guest.resume()
                    self.state = "running"
                    self.emit("RESUME", None)
                else:
                    self.state = "paused"
        self._incoming_ended(result, t0, exit_on_error)

    def _incoming_ended(self, result: dict[str, Any], t0: float, exit_on_error: bool) -> None:
        """The incoming migration's end: ``query-migrate`` and the MIGRATION event; a failure quits
        the VM when ``exit_on_error`` (QEMU's migrate-incoming default)."""
        with self.lock:
            info: dict[str, Any] = {"status": result.get("status", "failed"),
                                    "total-time": round((time.monotonic() - t0) * 1000)}
            if info["status"] == "completed":
                self._incoming = info | {"livemig": {k: v for k, v in result.items() if k != "status"}}
                self._migration_event("completed")
                if self.state == "inmigrate":
                    self._taken_over()
                return
            info["status"] = "failed"
            info["error-desc"] = str(result.get("error-desc", "incoming migration failed"))
            self._incoming = info
            self._migration_event("failed")
        if exit_on_error and self.on_quit is not None:
            self.on_quit(f"load of migration failed: {info['error-desc']}", 1)

    def _taken_over(self) -> None:
        """The incoming guest is ours (before the source hears it): running, or with -S (or stop while
        inmigrate) loaded and never run, waiting for cont (QEMU: paused). RESUME comes before
        MIGRATION completed, as in QEMU's process_incoming_migration_bh."""
        with self.lock:
            self._started = True  # its state is loaded: cont resumes it
            if self.destination is not None and self.destination.handover.resume_guest:
                self.state = "running"
                self.emit("RESUME", None)
            else:
                self.state = "paused"

    def _watch_incoming(self, dst: Destination, done: threading.Event) -> None:
        while not done.wait(0.02):
            if dst.main is not None and self._incoming.get("status") == "setup":
                self._incoming["status"] = "active"
                self._migration_event("active")
                return

    # --- life cycle ------------------------------------------------------------------------------
    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def close(self) -> None:
        """End any migration (the outgoing one cancelled, the incoming one failed) and free the guest."""
        if self.source is not None:
            self.source.cancel()
            self._switchover.set()
        if self.destination is not None and self._incoming.get("status") in ("setup", "active"):
            self.destination.fail(MigrationError("the VM process is quitting"), "destination")
        for t in self._threads:
            t.join(timeout=10)
        self.guest.close()


def _address(uri: str) -> Address:
    try:
        return parse_address(uri)
    except MigrationError as exc:
        raise QMPError(str(exc)) from exc


def _socket_address(address: Address, port: int) -> dict[str, Any]:
    if address.scheme == "unix":
        return {"type": "unix", "path": address.path}
    return {"type": "inet", "host": address.host, "port": str(port or address.port)}


def parameter_fields() -> list[tuple[str, type]]:
    """(QEMU name, Python type) of every MigrationParameters field, in declaration order."""
    types = {"int": int, "str": str, "bool": bool, "float": float}
    out = []
    for f in dataclasses.fields(MigrationParameters):
        t = f.type if isinstance(f.type, type) else types.get(str(f.type), str)
        out.append((f.name.replace("_", "-"), t))
    return out
