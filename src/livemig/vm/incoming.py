"""The VM as a migration destination: ``migrate-incoming`` (a source's stream, or a livemig
mapped-ram snapshot from ``file:PATH``), ``migrate-recover`` for a paused post-copy migration, and
what the end of an incoming migration does to the run state and the events.

Refusals are QEMU's words (migration/migration.c: qmp_migrate_incoming, qmp_migrate_recover). In
post-copy the guest runs here from the switch on (RESUME at the source's RUN) while its missing pages
still arrive; ``query-migrate`` says ``postcopy-active`` until the last page landed.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from ..errors import MigrationError
from ..migration.destination import Destination
from ..migration.mapped_load import FileLoad
from ..monitor.schema import QMPError
from ..transport.secure import tls_listener
from ..transport.sockets import Listener
from .core import POSTCOPY_STATUSES, VMCore, address_of, socket_address


class Incoming(VMCore):
    """The destination half of the VM's monitor commands (QMPError on refusal)."""

    def migrate_incoming(self, uri: str, exit_on_error: bool = True) -> None:
        with self.lock:
            if self._incoming_started:
                raise QMPError("The incoming migration has already been started")
            if self.state != "inmigrate":
                raise QMPError("'-incoming' was not specified on the command line")
            if uri.startswith("file:"):
                self._incoming_file(uri.removeprefix("file:"), exit_on_error)
                return
            address = address_of(uri)
            try:
                tls = self.tls.resolve(server=True)
                where = address if tls is None else tls_listener(address, tls, self.params.multifd_channels)
                # post-copy only when asked: the destination then checks userfaultfd at ADVISE
                postcopy: dict[str, Any] = {"postcopy_ram": True} if self.caps["postcopy-ram"] else {}
                dst = Destination(where, copy.copy(self.params), guest=self.guest, uuid=self.uuid,
                                  timeout=self.timeout, full_verify=self.full_verify, dump_ram=self.dump_ram,
                                  **postcopy)
            except MigrationError as exc:
                raise QMPError(str(exc)) from exc
            self._incoming_started = True
            self.destination = dst
            dst.handover.resume_guest = self.autostart  # -S: the guest never runs before cont
            dst.handover.on_resumed = self._taken_over
            self._incoming = {"status": "setup", "socket-address": [socket_address(address, dst.port)]}
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
        """``setup`` -> ``active`` once the main channel is accepted, then the destination's post-copy
        statuses (``postcopy-active``, ``postcopy-paused``, ``postcopy-recover``) as they change, each
        with its MIGRATION event, looked at every 20 ms (a status that lasts less may not show); the
        final status is :meth:`_incoming_ended`'s."""
        while not done.wait(0.02):
            with self.lock:
                current = self._incoming.get("status")
                if current == "setup" and dst.main is not None:
                    new: str | None = "active"
                else:
                    new = dst.postcopy_status if dst.postcopy_status in POSTCOPY_STATUSES else None
                if new is not None and new != current and current in ("setup", "active", *POSTCOPY_STATUSES):
                    self._incoming["status"] = new
                    self._migration_event(new)

    #: the listener of the last ``migrate-recover`` (closed when another one replaces it)
    _recover_listener: Listener | None = None

    def migrate_recover(self, uri: str) -> None:
        """``migrate-recover URI``: listen at ``uri`` for the source's ``migrate URI resume=true``
        (QEMU's qmp_migrate_recover: only in ``postcopy-paused``, refused in these words otherwise;
        a second one while still paused listens at its URI instead, as QEMU 8.2+ releases the
        previous transport)."""
        with self.lock:
            if self.destination is None or self._incoming.get("status") != "postcopy-paused":
                raise QMPError("Migrate recover can only be run when postcopy is paused.")
            address = address_of(uri)
            try:
                listener = tls_listener(address, self.tls.resolve(server=True), self.params.multifd_channels)
            except (MigrationError, OSError) as exc:
                raise QMPError(f"{uri}: {exc}") from exc
            try:
                self.destination.recover(listener)
            except MigrationError as exc:
                listener.close()
                raise QMPError(str(exc)) from exc
            previous, self._recover_listener = self._recover_listener, listener
            if previous is not None:
                previous.close()
            self._incoming["socket-address"] = [socket_address(address, listener.port)]
