"""The VM behind the monitor commands: a guest, QEMU's run states, migration capabilities and
parameters, and at most one outgoing and one incoming migration at a time.

Run states are QEMU's RunState names: ``prelaunch`` (started with -S, never run), ``running``,
``paused`` (stop), ``inmigrate`` (waiting for or receiving a migration), ``finish-migrate`` (the
source at switchover and throughout post-copy), ``postmigrate`` (the source after a completed
migration). The outgoing commands live in :mod:`.outgoing`, the incoming ones in :mod:`.incoming`,
their shared state in :mod:`.core`. Refusals use
QEMU's words (migration/migration.c, monitor/qmp-cmds.c). A migration runs
:meth:`livemig.migration.source.Source.run` (or ``Destination.run``) in its own thread; the
monitor stays responsive throughout and ``query-migrate`` reads the live statistics.

Events (through ``emit(name, data)``, from any thread): STOP, RESUME, and, with capability
``events`` on, MIGRATION {status} (post-copy's ``postcopy-active``, ``postcopy-paused`` and
``postcopy-recover`` included) and MIGRATION_PASS {pass} (pass = dirty-sync count, as QEMU).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from ..errors import MigrationError
from ..guest import uffd
from ..monitor.schema import QMPError
from ..params import MigrationParameters
from .core import CAPABILITIES, POSTCOPY_STATUSES, REQUIRED_CAPABILITIES, RUNNING_STATUSES, Emit
from .incoming import Incoming
from .outgoing import POSTCOPY_CONT, UNKNOWN_CONT, Outgoing
from .tlsobjects import TLS_PARAMETERS

__all__ = ["CAPABILITIES", "POSTCOPY_CONT", "POSTCOPY_STATUSES", "REQUIRED_CAPABILITIES", "RUNNING_STATUSES",
           "UNKNOWN_CONT", "VM", "Emit", "parameter_fields"]


class VM(Outgoing, Incoming):
    """One virtual machine; every public method is a monitor command's body (QMPError on refusal)."""

    # --- run state -------------------------------------------------------------------------------
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
                    raise QMPError(self._unknown_reason or UNKNOWN_CONT)
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
    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in self.caps.items()]

    def set_capabilities(self, caps: list[dict[str, Any]]) -> None:
        """As QEMU's migrate_caps_check: refused while a migration runs; ``postcopy-ram`` turned on in
        ``inmigrate`` (the destination, which serves the faults) needs userfaultfd here."""
        with self.lock:
            if self.migration_active():
                raise QMPError("There's a migration process in progress")
            new = self.caps | {c["capability"]: c["state"] for c in caps}
            if new["postcopy-ram"] and not self.caps["postcopy-ram"] and self.state == "inmigrate":
                reason = uffd.unavailable()
                if reason is not None:
                    raise QMPError(f"Postcopy is not supported: {reason}")
            self.caps = new

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

    # --- life cycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """End any migration (the outgoing one cancelled, the incoming one failed) and free the guest."""
        if self.source is not None:
            self.source.cancel()
            self._switchover.set()
        if self.destination is not None and self._incoming.get("status") in ("setup", "active"):
            self.destination.fail(MigrationError("the VM process is quitting"), "destination")
        pc = self.destination.postcopy if self.destination is not None else None
        if pc is not None:
            # a guest in post-copy dies with this process: wake its vCPUs waiting on pages that will
            # not come (they would block in KVM_RUN, and the process with them, forever)
            pc.close()
        for t in self._threads:
            t.join(timeout=10)
        self.guest.close()


def parameter_fields() -> list[tuple[str, type]]:
    """(QEMU name, Python type) of every MigrationParameters field, in declaration order."""
    types = {"int": int, "str": str, "bool": bool, "float": float}
    out = []
    for f in dataclasses.fields(MigrationParameters):
        t = f.type if isinstance(f.type, type) else types.get(str(f.type), str)
        out.append((f.name.replace("_", "-"), t))
    return out
