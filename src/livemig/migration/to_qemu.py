"""livemig's source migrating its guest's RAM into a real QEMU (``livemig migrate --peer qemu``).

The same precopy engine as :class:`.source.Source` (passes, dirty log, multifd channels, packets,
convergence, bandwidth cap), with the stream a QEMU destination reads (docs/qemu.md, "QEMU as the destination")::

    main:   QEVM header, configuration (the destination's machine type, e.g. pc-q35-10.0)
    chans:  MultiFDInit_t on each of N channels (the destination's VM UUID), opened at once:
            QEMU reads nothing before every channel is there
    main:   START ram (section id 2): MEM_SIZE = the destination's blocks and used lengths; sync; EOS
            PART ram per pass: packets name the destination's largest block; sync; EOS
            -- guest paused --
            END ram: the last pages; sync; EOS
            EOF, VMDESCRIPTION
    sync:   QEMU 8.0+ machine types: SYNC on every channel, then MULTIFD_FLUSH before the EOS;
            QEMU 7.2 (or a 7.2 machine type): SYNC on every channel, the EOS itself is the marker

No livemig/config, no handover messages, no CPU or device state: only RAM crosses, and QEMU starts
its vCPUs from reset (or runs whatever its firmware does) when it resumes. The commit point is the
stream's end: once EOF and VMDESCRIPTION are written QEMU loads and runs (or keeps paused, with
``-S``) on its own, so a cancel after it is too late. The outcome comes from the destination's
``query-migrate`` over its QMP monitor: ``completed`` completes the migration (the source guest
stays paused, ``postmigrate``); ``failed``, or a QEMU that exits (it does after a failed incoming
migration), resumes the source guest, livemig acting as the operator who checked the destination;
no answer within ``--timeout`` leaves the outcome unknown (guest paused, exit status 3).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..errors import Cancelled, MigrationError, ParameterError
from ..guest import Guest
from ..params import MigrationParameters
from ..transport.address import Address
from ..transport.sockets import Connector
from ..wire import stream
from .handover import HandoverTimeout, PeerFailed, SourceHandover
from .qemu_qmp import (
    METHODS,
    QemuDestination,
    QemuMonitor,
    await_incoming,
    check_fit,
    configure,
    parse_qmp_address,
    probe,
)
from .source import Source
from .stats import MigrationStats


class QemuHandover(SourceHandover):
    """The source's handover rules (:data:`.protocol.SOURCE`) with a QEMU destination, which sends
    no messages: the end of the stream is the commit, QEMU's ``query-migrate`` the answer."""

    def stream_sent(self) -> None:
        """EOF and VMDESCRIPTION are written: committed (QEMU needs no Commit message). Raises
        Cancelled when a cancel came first (the guest then resumes: QEMU never got the whole stream)."""
        with self._lock:
            if self.cancelled:
                raise Cancelled("migration cancelled")
            self.h.step("prepared")  # its only action, SEND_COMMIT, has no one to go to

    def completed(self) -> None:
        """QEMU's incoming migration completed: the source guest stays stopped (postmigrate)."""
        self._do(self.h.step("resumed"))

    def destination_failed(self) -> None:
        """QEMU's incoming migration failed (or QEMU exited, as it does then): its guest will not
        run, so livemig, having checked, resumes the source guest, as the operator would after an
        unknown outcome."""
        self.h.step("refused")  # -> unknown; its REPORT_UNKNOWN is answered at once by the resume
        self._do(self.h.step("cont"))


class QemuSource(Source):
    """:class:`.source.Source` toward a QEMU destination described by ``dest``, driven over ``monitor``
    (see the module docstring). Same arguments as Source otherwise; ``uuid`` is the destination's."""

    def __init__(self, guest: Guest, address: Address | Connector, params: MigrationParameters, *,
                 dest: QemuDestination, monitor: QemuMonitor, **kwargs: Any) -> None:
        if len(guest.blocks) != 1:
            raise MigrationError(f"a guest of {len(guest.blocks)} RAM blocks cannot go into one QEMU block")
        self.dest = dest
        self.monitor = monitor
        self.guest_block = guest.blocks[0].name
        super().__init__(guest, address, params, uuid=dest.uuid, **kwargs)
        self.qemu_handover = QemuHandover(guest, self._note)
        self.handover = self.qemu_handover

    #: QEMU's destination syncs at the END section's EOS (7.2) or MULTIFD_FLUSH (8.0+) whatever it carries
    FINAL_SYNC_ALWAYS = True

    def _wire_block(self, name: str) -> str:
        return self.dest.ram_block[0] if name == self.guest_block else name

    def _ram_blocks(self) -> list[tuple[str, int]]:
        return list(self.dest.blocks)

    def _open_stream(self) -> None:
        """Header and configuration naming the destination's machine; no answer to wait for."""
        self._main_write(stream.file_header() + stream.configuration(self.dest.machine), ram=False)

    def _catch_up(self) -> None:
        """No livemig return path to ask: wait (at most downtime-limit) until the destination's kernel
        acknowledged every byte written (what QEMU's own process still holds is not known)."""
        self.channels.drain(self.params.downtime_limit / 1000)

    def _flush_round(self) -> None:
        """SYNC on every channel; then MULTIFD_FLUSH, unless the EOS that follows is the marker."""
        self.channels.flush()
        if not self.dest.per_section_sync:
            self._main_write(stream.ram_multifd_flush())

    def _hash_loop(self) -> None:
        """No digests: QEMU does not check them (RAM is compared by the tests, not the protocol)."""

    def _hand_over(self, marks: list[tuple[str, float]]) -> dict[str, Any]:
        vmdesc = {"page_size": self.page_size, "devices": []}
        self._main_write(stream.eof() + stream.vm_description(json.dumps(vmdesc)), ram=False)
        self.qemu_handover.stream_sent()
        marks.append(("stream sent", time.monotonic()))
        try:
            info = await_incoming(self.monitor, self.timeout)
        except TimeoutError as exc:
            raise HandoverTimeout(str(exc)) from exc
        except MigrationError as exc:  # QMP closed: QEMU exited, as it does after a failed load
            self.qemu_handover.destination_failed()
            raise PeerFailed(f"the destination QEMU's monitor closed before its migration completed (QEMU exits "
                             f"after a failed incoming migration): {exc}") from exc
        if info.get("status") != "completed":
            self.qemu_handover.destination_failed()
            reason = info.get("error-desc", "no reason given")
            raise PeerFailed(f"the destination QEMU's incoming migration failed: {reason}")
        self.qemu_handover.completed()
        marks.append(("destination completed", time.monotonic()))
        run = self.monitor.execute("query-status").get("status", "")
        self._note(f"destination QEMU {self.dest.version_text} ({self.dest.machine}) holds the guest's RAM in "
                   f"'{self.dest.ram_block[0]}' and is {run}; only RAM crossed: its vCPUs start from reset")
        return {**self.dest.describe(), "status": "completed", "run-state": run}


def add_peer_options(p: argparse.ArgumentParser) -> None:
    """``--peer`` and ``--peer-qmp`` of ``livemig migrate``."""
    g = p.add_argument_group("a QEMU destination (docs/qemu.md)")
    g.add_argument("--peer", choices=["livemig", "qemu"], default="livemig",
                   help="what listens at URI: livemig incoming (default), or a QEMU started with -incoming defer "
                        "(only RAM crosses; its vCPUs start from reset)")
    g.add_argument("--peer-qmp", metavar="ADDRESS",
                   help="with --peer qemu: the destination QEMU's QMP monitor, tcp:HOST:PORT or unix:PATH")


def check_peer_options(args: argparse.Namespace) -> None:
    """Refuse option combinations a QEMU destination cannot take (ParameterError naming them)."""
    if args.peer != "qemu":
        if args.peer_qmp:
            raise ParameterError(f"--peer-qmp {args.peer_qmp}: needs --peer qemu")
        return
    if not args.peer_qmp:
        raise ParameterError("--peer qemu needs --peer-qmp ADDRESS (the destination QEMU's QMP monitor)")
    parse_qmp_address(args.peer_qmp)
    if args.local:
        raise ParameterError("--peer qemu migrates to a running QEMU: give its URI, not --local")
    if args.tls_creds:
        raise ParameterError("--tls-creds: not available with --peer qemu (QEMU's TLS channels are not "
                             "supported by livemig's QEMU path yet)")
    if args.multifd_compression not in METHODS:
        raise ParameterError(f"--multifd-compression {args.multifd_compression}: not available with --peer qemu "
                             f"(one of {', '.join(METHODS)}, as the destination QEMU is built)")


class QemuPeer:
    """``--peer qemu``: the destination QEMU probed, checked and configured (before the guest is built),
    and the Source that migrates into it."""

    def __init__(self, args: argparse.Namespace, memory: int, params: MigrationParameters, uuid: bytes) -> None:
        self.monitor = QemuMonitor(args.peer_qmp, args.timeout)
        try:
            self.dest = probe(self.monitor)
            self.params = check_fit(self.dest, memory, params, uuid)
            configure(self.monitor, self.params, args.uri)
        except BaseException:
            self.monitor.close()
            raise

    def source(self, guest: Guest, address: Address | Connector, params: MigrationParameters,
               **kwargs: Any) -> QemuSource:
        """A :class:`QemuSource` with :class:`Source`'s arguments (``params`` and ``uuid`` are the peer's)."""
        kwargs.pop("uuid", None)
        return QemuSource(guest, address, self.params, dest=self.dest, monitor=self.monitor, **kwargs)

    def describe(self) -> str:
        name, size = self.dest.ram_block
        return f"QEMU {self.dest.version_text} ({self.dest.machine}), RAM into its block '{name}'"

    def summary(self, stats: MigrationStats) -> str:
        """The destination's outcome in one line, for the end of a completed migration."""
        run = stats.destination.get("run-state", "?")
        return (f"destination: QEMU {self.dest.version_text} completed the incoming migration and is {run}; "
                "only RAM crossed: its vCPUs start from reset")

    def close(self) -> None:
        self.monitor.close()
