"""The VM as a migration source: ``migrate`` (and ``resume: true``), ``migrate_cancel``,
``migrate-continue``, ``migrate-start-postcopy``, ``query-migrate`` and what the source's status
changes do to the run state and the events.

Refusals are QEMU's words (migration/migration.c: migrate_prepare, qmp_migrate_cancel,
qmp_migrate_start_postcopy). In post-copy the source's run state stays ``finish-migrate`` (guest
stopped) until the migration completes (``postmigrate``): from the switch on the guest runs on the
destination, so nothing here resumes it; a cut link leaves the migration ``postcopy-paused`` until
``migrate URI resume=true`` reconnects (the destination first runs ``migrate-recover``).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from ..errors import MigrationError
from ..migration.source import Source
from ..migration.stats import MigrationStats
from ..monitor.schema import QMPError
from ..transport.secure import tls_connector
from .core import POSTCOPY_STATUSES, REQUIRED_CAPABILITIES, VMCore, address_of

#: what the first ``cont`` after an unknown handover outcome answers (a second one resumes the guest)
UNKNOWN_CONT = ("The migration's outcome is unknown: this source committed the handover but never heard the "
                "destination resume, so the guest may run there. Check the destination first (query-status): "
                "if its guest runs, the migration completed and this guest must stay stopped (quit this VM). "
                "Only if the destination's guest does not run and never will (quit it first), send 'cont' "
                "again to resume the guest here")
#: the same after a post-copy migration failed past its switch (POSTCOPY_RUN went out)
POSTCOPY_CONT = ("The migration failed in post-copy: the guest ran on the destination from the switch on, so this "
                 "copy is stale (the destination holds every page written since) and the guest's state is split "
                 "between both sides. Resuming it here loses those writes, and two copies would run if the "
                 "destination's still does: quit the destination VM first. Send 'cont' again to resume this stale "
                 "copy anyway")


class Outgoing(VMCore):
    """The source half of the VM's monitor commands (QMPError on refusal)."""

    def migrate(self, uri: str, resume: bool = False) -> None:
        with self.lock:
            if resume:
                self._resume(uri)
                return
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
            address = address_of(uri)
            # post-copy only when asked: migrate-start-postcopy switches (no pass count from QMP)
            postcopy: dict[str, Any] = {"postcopy_ram": True} if self.caps["postcopy-ram"] else {}
            try:
                connector = tls_connector(address, self.tls.resolve(server=False))
                src = Source(self.guest, connector, copy.copy(self.params), uuid=self.uuid, timeout=self.timeout,
                             full_verify=self.full_verify, dump_ram=self.dump_ram,
                             auto_converge=self.caps["auto-converge"], **postcopy)
            except MigrationError as exc:
                raise QMPError(str(exc)) from exc
            # each status as it is entered (stats.status may already be the next one when read
            # from another thread: a resume steps postcopy-recover, the migration thread active)
            src.status.listeners.append(self._on_source_status)
            self.source, self._stats = src, src.stats
            self._unknown = self._unknown_told = False
            self._switchover.clear()
            self._spawn("migration", self._run_source, src)

    def _resume(self, uri: str) -> None:
        """``migrate URI resume=true``: reconnect a ``postcopy-paused`` migration (QEMU's
        migrate_prepare refuses it in any other status, in these words)."""
        if self.source is None or self._current_status() != "postcopy-paused":
            raise QMPError("Cannot resume if there is no paused migration")
        address = address_of(uri)
        try:
            self.source.resume(tls_connector(address, self.tls.resolve(server=False)))
        except MigrationError as exc:
            raise QMPError(str(exc)) from exc

    def migrate_start_postcopy(self) -> None:
        """QEMU's qmp_migrate_start_postcopy: refused when the capability is off or no migration
        ever started; after the migration ended (or once in post-copy) it does nothing, as QEMU
        (an error there would race with the migration's own end)."""
        if not self.caps["postcopy-ram"]:
            raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")
        if self.source is None:
            raise QMPError("Postcopy must be started after migration has been started")
        if self._current_status() not in ("setup", "active"):
            return
        try:
            self.source.start_postcopy()
        except MigrationError as exc:
            if self.source.status.state in ("setup", "active"):
                raise QMPError(str(exc)) from exc

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

    def _on_source_status(self, status: str) -> None:
        """The source's status changed to ``status`` (in the thread that stepped it, which waits for
        this to return: the migration thread, or the monitor's for a resume).

        ``device``: the guest stops first (run state ``finish-migrate``, STOP), as QEMU's
        migration_completion stops the VM before anything else; with ``pause-before-switchover`` the
        migration then waits in ``pre-switchover``, guest stopped, for ``migrate-continue`` or
        ``migrate_cancel``. ``postcopy-*``: the guest stays stopped (``finish-migrate``).
        ``failed``/``cancelled``: the run state follows the handover's guest state (``postmigrate``
        after an unknown outcome or a failure past the post-copy switch; else running again, or
        paused if ``stop`` paused it).
        """
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
            ran = self.source is not None and self.source.postcopy is not None and self.source.postcopy.ran
            self._unknown_reason = POSTCOPY_CONT if ran else UNKNOWN_CONT
        elif self._user_paused:
            self.guest.pause()
            self.state = "paused"
        else:
            if not self.guest.running:  # stopped here (finish-migrate) before the handover paused it
                self.guest.resume()
            self.state = "running"
            self.emit("RESUME", None)

    def migrate_continue(self, state: str) -> None:
        current = self._current_status()
        if current != state:
            raise QMPError(f"Migration not in expected state: {current}")
        self._switchover.set()

    def migrate_cancel(self) -> None:
        """QEMU's qmp_migrate_cancel; refused in post-copy, where neither side can go back."""
        if self._current_status() in POSTCOPY_STATUSES:
            raise QMPError("Postcopy migration in progress, cannot cancel.")
        if self.source is not None and self.migration_active():
            self.source.cancel()
            self._switchover.set()

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
