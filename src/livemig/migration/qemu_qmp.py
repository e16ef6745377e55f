"""A real QEMU as the destination: what livemig learns from it and sets on it over its QMP monitor.

``livemig migrate URI --peer qemu --peer-qmp ADDRESS`` reads, before anything moves
(docs/qemu.md, "What livemig asks the destination"):

- ``query-version``: the QEMU version, which decides the multifd synchronisation and whether packets
  may list zero pages;
- ``query-status``: the run state, which must be ``inmigrate`` (QEMU started with ``-incoming``);
- ``qom-get /machine type``: the machine's QOM type, e.g. ``pc-q35-10.0-machine``; the name in the
  stream's configuration record is that type without ``-machine`` (QEMU compares the two);
- ``human-monitor-command "info ramblock"``: every RAM block with its used length (MEM_SIZE must name
  the destination's own blocks and lengths);
- ``query-uuid``: the VM UUID every MultiFDInit_t must carry;
- ``query-migrate``: the incoming migration has not begun (no status, or ``setup``).

It then sets the ``multifd`` capability, ``multifd-channels`` and ``multifd-compression`` to the
source's values (QEMU 10 accepts the capability only before it listens: use ``-incoming defer``)
and, for ``-incoming defer``, starts ``migrate-incoming`` on the migration URI (a QEMU started with
``-incoming URI`` answers that it listens already).
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from typing import Any

from ..bench.qmpconn import QmpConnection
from ..errors import MigrationError, ParameterError
from ..params import MigrationParameters
from ..transport.address import Address, parse_address
from ..units import format_size

#: a row of HMP ``info ramblock`` (7.2: 5 columns; 10.x adds HVA and RO): name, page size, offset, used, total
_RAMBLOCK_ROW = re.compile(
    r"^\s*(?P<name>\S.*?)\s+(?P<psize>\d+ [KMGT]?i?B)\s+0x(?P<offset>[0-9a-fA-F]+)\s+0x(?P<used>[0-9a-fA-F]+)"
    r"\s+0x(?P<total>[0-9a-fA-F]+)(?:\s|$)"
)
#: the version at the end of a versioned machine type: pc-q35-7.2, pc-i440fx-10.0
_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")
#: QEMU's MultiFDCompression values this path is tested with (others are passed on; QEMU decides)
METHODS = ("none", "zlib", "zstd", "qatzip")


def parse_ramblocks(text: str) -> list[tuple[str, int]]:
    """HMP ``info ramblock`` output -> [(block id, used length in bytes)], in QEMU's order.

    Raises MigrationError when no row parses (not ``info ramblock`` output).
    """
    blocks = []
    for line in text.splitlines():
        m = _RAMBLOCK_ROW.match(line)
        if m:
            blocks.append((m.group("name"), int(m.group("used"), 16)))
    if not blocks:
        raise MigrationError(f"the destination's 'info ramblock' lists no RAM block: {text.strip()[:200]!r}")
    return blocks


def machine_name(qom_type: str) -> str:
    """The machine type as the configuration record names it: the QOM type without ``-machine``."""
    return qom_type.removesuffix("-machine")


def machine_version(machine: str) -> tuple[int, int] | None:
    """The QEMU version a versioned machine type emulates (``pc-q35-7.2`` -> (7, 2)); None if unversioned."""
    m = _MACHINE_VERSION.search(machine)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class QemuDestination:
    """What the destination QEMU told over QMP, and what follows from it."""

    #: (major, minor, micro) of ``query-version``
    version: tuple[int, int, int]
    #: the configuration record's machine type, e.g. ``pc-q35-10.0``
    machine: str
    #: every RAM block (id, used length in bytes), as MEM_SIZE lists them
    blocks: tuple[tuple[str, int], ...]
    #: the VM UUID (16 bytes) every multifd handshake carries
    uuid: bytes

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def ram_block(self) -> tuple[str, int]:
        """The largest block (the first of equals): livemig's guest RAM goes there."""
        return max(self.blocks, key=lambda b: b[1])

    @property
    def per_section_sync(self) -> bool:
        """True: the multifd channels sync at every RAM section's EOS (QEMU 7.2; a newer QEMU with a
        machine type of 7.2 or older, whose ``multifd-flush-after-each-section`` is on); False: at each
        MULTIFD_FLUSH record (8.0+ machine types). docs/wire.md, "Main stream"."""
        emulated = machine_version(self.machine)
        return self.version[:2] < (8, 0) or (emulated is not None and emulated <= (7, 2))

    @property
    def reads_zero_lists(self) -> bool:
        """QEMU 9.0+ reads the packet's ``zero_pages`` list; 7.2 ignores it (the pages would be lost)."""
        return self.version[:2] >= (9, 0)

    def describe(self) -> dict[str, Any]:
        """For the statistics' ``destination`` entry."""
        name, size = self.ram_block
        return {"qemu-version": self.version_text, "machine": self.machine, "ram-block": name,
                "ram-block-size": size, "sync": "per-section" if self.per_section_sync else "multifd-flush"}


class QemuMonitor:
    """The destination's QMP monitor at ``--peer-qmp ADDRESS``; errors name that option."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        where = parse_qmp_address(address)
        target: str | tuple[str, int] = where.path if where.scheme == "unix" else (where.host, where.port)
        try:
            self.conn = QmpConnection.connect(target, "the destination QEMU", timeout)
        except MigrationError as exc:
            raise MigrationError(f"--peer-qmp {address}: no QMP monitor answered within {timeout:g} s "
                                 "(QEMU's -qmp ...,server=on,wait=off)") from exc

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """The command's ``return`` value; MigrationError naming the command and QEMU's words."""
        return self.conn.execute(command, arguments, timeout)

    def close(self) -> None:
        self.conn.close()


def parse_qmp_address(text: str) -> Address:
    """``tcp:HOST:PORT`` or ``unix:PATH``; ParameterError naming ``--peer-qmp`` otherwise."""
    try:
        return parse_address(text)
    except ParameterError as exc:
        raise ParameterError(f"--peer-qmp {text}: expected tcp:HOST:PORT or unix:PATH (the destination QEMU's "
                             "QMP monitor)") from exc


def probe(mon: QemuMonitor) -> QemuDestination:
    """Ask the destination what it is (see the module docstring). MigrationError when it is not
    waiting for an incoming migration."""
    status = mon.execute("query-status").get("status")
    if status != "inmigrate":
        raise MigrationError(f"the destination QEMU at --peer-qmp {mon.address} is '{status}', expected "
                             "'inmigrate' (start it with -incoming defer)")
    v = mon.execute("query-version")["qemu"]
    blocks = parse_ramblocks(mon.execute("human-monitor-command", {"command-line": "info ramblock"}))
    return QemuDestination(
        version=(int(v["major"]), int(v["minor"]), int(v["micro"])),
        machine=machine_name(str(mon.execute("qom-get", {"path": "/machine", "property": "type"}))),
        blocks=tuple(blocks),
        uuid=uuidlib.UUID(mon.execute("query-uuid")["UUID"]).bytes,
    )


def check_fit(dest: QemuDestination, memory: int, params: MigrationParameters, uuid: bytes) -> MigrationParameters:
    """Refuse what cannot land before anything moves; returns the parameters to send with.

    - livemig's guest RAM (``memory`` bytes) must be the size of the destination's largest block;
    - a ``--uuid`` given must be the destination's (``query-uuid``);
    - zero-page lists go only to QEMU 9.0+: toward an older one zero pages travel as normal pages
      (``zero-page-detection`` none), which 7.2 reads.

    Raises ParameterError naming the option.
    """
    name, size = dest.ram_block
    if size != memory:
        raise ParameterError(
            f"--memory {format_size(memory)}: the destination QEMU's largest RAM block '{name}' is "
            f"{format_size(size)} ({size} bytes); livemig's guest RAM must be the same size (start QEMU "
            f"with -m {memory // (1 << 20)}M, or give --memory {size // (1 << 20)}M)")
    if uuid != bytes(16) and uuid != dest.uuid:
        raise ParameterError(f"--uuid {uuidlib.UUID(bytes=uuid)}: the destination QEMU's UUID is "
                             f"{uuidlib.UUID(bytes=dest.uuid)} (QEMU compares it in every multifd handshake)")
    if params.zero_page_detection == "multifd" and not dest.reads_zero_lists:
        return replace(params, zero_page_detection="none")
    return params


def configure(mon: QemuMonitor, params: MigrationParameters, uri: str) -> None:
    """Set ``multifd``, ``multifd-channels`` and ``multifd-compression`` on the destination, and start
    ``migrate-incoming uri`` when it was started with ``-incoming defer`` (with ``-incoming URI`` it
    listens already: QEMU 7.2 takes the settings then, QEMU 10 refuses the capability). MigrationError
    with QEMU's words when it refuses (e.g. a method it was built without)."""
    incoming = mon.execute("query-migrate").get("status", "none")
    if incoming not in ("none", "setup"):
        raise MigrationError(f"the destination QEMU's incoming migration is '{incoming}', expected none "
                             "(-incoming defer) or setup (listening)")
    caps = {c["capability"]: c["state"] for c in mon.execute("query-migrate-capabilities")}
    current = mon.execute("query-migrate-parameters")
    want = {"multifd-channels": params.multifd_channels, "multifd-compression": params.multifd_compression}
    try:
        if not caps.get("multifd"):
            mon.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        changed = {k: v for k, v in want.items() if current.get(k) != v}
        if changed:
            mon.execute("migrate-set-parameters", changed)
    except MigrationError as exc:
        hint = ""
        if incoming == "setup" or "incoming" in str(exc):
            hint = " (start QEMU with -incoming defer: livemig sets them before it listens)"
        raise MigrationError(f"the destination QEMU refused the multifd settings{hint}: {exc}") from exc
    try:
        mon.execute("migrate-incoming", {"uri": uri})
    except MigrationError as exc:
        # -incoming URI on QEMU's command line: it listens already (where the user told it to);
        # QEMU 7.2 shows no status for that, so its answer is the only sign
        if "already been started" not in str(exc):
            raise


def await_incoming(mon: QemuMonitor, timeout: float) -> dict[str, Any]:
    """Poll the destination's ``query-migrate`` until its incoming migration is ``completed`` or
    ``failed``; returns the last answer. Raises TimeoutError when neither came (or QMP did not answer)
    within ``timeout`` s, MigrationError when QMP failed otherwise (closed: QEMU exits after a failed
    incoming migration)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info: dict[str, Any] = mon.execute("query-migrate", timeout=max(0.1, deadline - time.monotonic()))
        except MigrationError as exc:
            if isinstance(exc.__cause__, TimeoutError):  # QEMU is there but did not answer: not a failure
                raise TimeoutError(f"the destination QEMU did not answer query-migrate within {timeout:g} s "
                                   "after the stream ended") from exc
            raise
        if info.get("status") in ("completed", "failed"):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"the destination QEMU's incoming migration is still "
                               f"'{info.get('status', 'none')}' {timeout:g} s after the stream ended")
        time.sleep(0.02)
