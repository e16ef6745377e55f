"""The state every part of :class:`~livemig.vm.machine.VM` shares: the guest, QEMU's run state,
migration capabilities and parameters, the current outgoing and incoming migrations, and the
helpers both directions use (events, threads, URIs).

:mod:`.outgoing` (``migrate`` and what follows it) and :mod:`.incoming` (``migrate-incoming``,
``migrate-recover``) build on :class:`VMCore`; :mod:`.machine` joins them into the VM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import MigrationError
from ..guest import Guest
from ..migration.destination import Destination
from ..migration.source import Source
from ..migration.stats import MigrationStats
from ..monitor.schema import QMPError
from ..params import MigrationParameters
from ..transport.address import Address, parse_address
from .tlsobjects import TlsObjects

#: capability -> default. livemig moves RAM over multifd channels with a return path only, so those
#: two default on (QEMU: off) and a migration with either turned off is refused.
CAPABILITIES: dict[str, bool] = {"multifd": True, "return-path": True, "events": False,
                                 "pause-before-switchover": False, "auto-converge": False,
                                 "postcopy-ram": False}
REQUIRED_CAPABILITIES = ("multifd", "return-path")
#: QEMU's post-copy statuses (qapi/migration.json MigrationStatus)
POSTCOPY_STATUSES = ("postcopy-active", "postcopy-paused", "postcopy-recover")
#: the statuses QEMU's migration_is_running() counts as a migration in progress
RUNNING_STATUSES = ("setup", "active", "pre-switchover", "device", "cancelling", *POSTCOPY_STATUSES)

Emit = Callable[[str, "dict[str, Any] | None"], None]


def _no_emit(_name: str, _data: dict[str, Any] | None = None) -> None:
    pass


class VMCore:
    """The VM's shared state (see the module docstring); no monitor command lives here."""

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
        #: what the first ``cont`` answers while ``_unknown`` (a second one resumes the guest)
        self._unknown_reason = ""
        self._threads: list[threading.Thread] = []
        # incoming
        self.destination: Destination | None = None
        self._incoming_started = False
        self._incoming: dict[str, Any] = {}

    def _start_guest(self) -> None:
        if self._started:
            self.guest.resume()
        else:
            self.guest.start()
            self._started = True

    def migration_active(self) -> bool:
        """A migration in progress, either way (QEMU's migration_is_running, post-copy included)."""
        out = self._stats is not None and self._stats.status in RUNNING_STATUSES
        return out or self._incoming.get("status") in ("setup", "active", *POSTCOPY_STATUSES)

    def _current_status(self) -> str:
        if self._waiting_switchover:
            return "pre-switchover"
        if self._stats is not None:
            return self._stats.status
        return str(self._incoming.get("status", "none"))

    def _migration_event(self, status: str) -> None:
        if self.caps["events"]:
            self.emit("MIGRATION", {"status": status})

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()


def address_of(uri: str) -> Address:
    """``tcp:HOST:PORT`` / ``unix:PATH`` parsed; QMPError in the parser's words."""
    try:
        return parse_address(uri)
    except MigrationError as exc:
        raise QMPError(str(exc)) from exc


def socket_address(address: Address, port: int) -> dict[str, Any]:
    """QEMU's SocketAddress of where a destination listens (``port``: the bound one, for port 0)."""
    if address.scheme == "unix":
        return {"type": "unix", "path": address.path}
    return {"type": "inet", "host": address.host, "port": str(port or address.port)}
