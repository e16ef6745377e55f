"""The source side of a precopy migration over multifd channels.

Linear code in :meth:`Source.run`, one thread per multifd channel, policy factored out
(:mod:`.convergence`), channel workers in :mod:`.multifd`. Sequence on the wire (docs/wire.md,
"Main stream", per-round flush mode)::

    main:   QEVM header, configuration
            FULL livemig/config (guest config + parameters)   <- destination answers ready/error
    chans:  MultiFDInit_t on each of N channels
    main:   START ram: MEM_SIZE, [SYNC all channels] MULTIFD_FLUSH, EOS
            PART ram per pass: pages go on the channels; [SYNC all] MULTIFD_FLUSH, EOS
            -- guest paused: final dirty sync --
            END ram: last pages; [SYNC all] MULTIFD_FLUSH, EOS
            FULL livemig/vcpu (guest state blob), FULL livemig/digest (RAM block digests), EOF
    return: Prepared (destination digests)   -> checked against ours
    main:   Commit                            == the commit point
    return: Resumed                           -> downtime ends

The handover (:mod:`.protocol` for its rules, :mod:`.handover` for their driver) decides what the
guest does on every failure: before the commit point a failure or a cancel resumes it (status
failed/cancelled with the reason); after it the guest stays stopped (``postmigrate``), and when no
Resumed came the outcome is ``unknown`` (status failed, ``stats.handover == "unknown"``) until the
operator checks the destination. A cancel after the commit is answered too late.

``max-bandwidth`` caps every byte the source writes (main stream, handshakes, packets, SYNCs) until
the guest is paused; during switchover the cap is lifted, as QEMU does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import xxhash

from ..compress import Method, create_method
from ..compress.auto import AUTO
from ..errors import Cancelled, MigrationError
from ..guest import Guest
from ..params import MigrationParameters
from ..ram.digest import ChunkDigest
from ..ram.pages import merge_pages, warm_numpy
from ..transport.address import Address
from ..transport.ratelimit import RateLimiter
from ..transport.sockets import AddressConnector, Connector, send_buffers
from ..wire import packet, stream
from . import protocol, state
from .autopick import resolve_auto
from .convergence import Convergence
from .handover import PeerFailed, ReturnPath, SourceHandover, failure_text
from .multifd_send import SendChannels, SendContext
from .postcopy_source import PostcopySource
from .protocol import MACHINE_TYPE, SECTION_CONFIG, SECTION_DIGEST, SECTION_RAM, SECTION_VCPU
from .stats import MigrationStats, ResourceMeter, downtime_phases
from .throttling import GuestThrottling

#: seconds after a cancel before its sockets are shut down for a migration thread that did not get
#: to it (stuck in a write): time for the Abort and its acknowledgement (handover.ABORT_ACK)
CANCEL_GRACE = 2.0


class Source:
    """Migrates ``guest`` to the destination listening at ``address`` (an Address, or any Connector,
    e.g. an in-memory :class:`~livemig.transport.sockets.SocketPairLink`).

    ``run()`` blocks until the migration ends and returns the statistics; it does not raise for a
    failed or cancelled migration (the status and ``error`` say what happened). ``cancel()`` may be
    called from any thread.
    """

    #: a livemig destination needs no SYNC round when the final pass sends no page (docs/wire.md,
    #: "Convergence"); a peer that synchronises at every EOS (QEMU 7.2) does
    FINAL_SYNC_ALWAYS = False

    def __init__(
        self,
        guest: Guest,
        address: Address | Connector,
        params: MigrationParameters,
        *,
        uuid: bytes = bytes(16),
        timeout: float = 30.0,
        full_verify: bool = False,
        dump_ram: str | None = None,
        wait_report: float = 0.0,
        auto_converge: bool = False,
        postcopy_ram: bool = False,
        postcopy_after_passes: int | None = None,
        on_progress: Callable[[MigrationStats], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        params.check()
        self.guest = guest
        self.log = log or (lambda _m: None)
        self.handover = SourceHandover(guest, self._note)
        self.connector: Connector = AddressConnector(address) if isinstance(address, Address) else address
        self.params = params
        self.uuid = uuid
        self.timeout = timeout
        self.full_verify = full_verify
        self.dump_ram = dump_ram
        self.wait_report = wait_report
        self.on_progress = on_progress
        self.page_size = guest.page_size
        self.page_count = packet.page_count(self.page_size)
        # ``auto`` is resolved at setup (:func:`.autopick.resolve_auto`); until then the channels hold ``none``
        auto = params.multifd_compression == AUTO
        self.method: Method = create_method("none" if auto else params.multifd_compression, params.level(),
                                            self.page_size)
        self._cancel = threading.Event()
        #: set on a cancel or a failure: cuts every limiter wait short (the sockets are shut down, so
        #: the next write fails at once instead of after the channels' whole debt)
        self._stop = threading.Event()
        self.limiter = RateLimiter(params.max_bandwidth, sleep=self._stop.wait)
        self.status = state.StatusMachine()
        self.stats = MigrationStats(
            page_size=self.page_size,
            method=AUTO if auto else self.method.name,
            level=params.level() if self.method.levels else None,
            backend=self.method.backend(),
            accelerated=self.method.accelerated(),
            max_bandwidth=params.max_bandwidth,
            ram_total=guest.ram_size,
            remaining=guest.ram_size,  # nothing sent yet
            guest=guest.describe(),
            expected_downtime_ms=params.downtime_limit,  # QEMU's initial value
        )
        self.status.listeners.append(self._on_status)
        warm_numpy()
        self.views = {b.name: b.view() for b in guest.blocks}
        self.digests = {b.name: ChunkDigest(self.views[b.name], self.page_size) for b in guest.blocks}
        zero_detect = params.zero_page_detection == "multifd"
        self.channels = SendChannels(
            SendContext(
                uuid=uuid,
                page_size=self.page_size,
                method=self.method,
                views={self._wire_block(n): v for n, v in self.views.items()},
                pages64={self._wire_block(b.name): b.pages.view(np.uint64) for b in guest.blocks}
                if zero_detect else None,
                limiter=self.limiter,
                failed=self.channel_failed,
                digests=self.digests,
            ),
            self._check,
            timeout,
        )
        self.main: socket.socket | None = None
        self.rp: ReturnPath | None = None
        #: COMMAND PINGs written so far (each one's value)
        self._pings = 0
        self.meter = ResourceMeter()
        self._failure = state.FirstFailure()
        self._done = threading.Event()
        self._running_bytes = True
        #: pages found dirty by the last sync before switchover, still to be sent
        self._pending: dict[str, np.ndarray] = {}
        #: capability auto-converge: the policy that throttles the guest's vCPUs (None: off)
        self.throttling = GuestThrottling(guest, params, self.stats) if auto_converge else None
        self.stats.auto_converge = auto_converge
        #: capability postcopy-ram (docs/postcopy.md): its half of the migration (None: off)
        self.postcopy = PostcopySource(self, postcopy_after_passes) if postcopy_ram else None
        self.stats.postcopy_ram = postcopy_ram

    # --- public ----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the migration to stop. Before the commit point the guest keeps (or resumes) running;
        after it the cancel is answered :data:`.protocol.TOO_LATE` (logged, in ``stats.notes``)
        and changes nothing: the guest stays stopped."""
        if not self.handover.cancel():
            if self.postcopy is not None:
                self.postcopy.abandon()  # a paused post-copy gives up; an active one goes on
            return
        self._cancel.set()
        self._stop.set()
        if self.status.try_step(state.CANCELLING):
            # the migration thread sees the cancel within a poll, sends Abort on the main channel
            # and then closes every socket; if it is stuck in a write, this closes them for it
            guard = threading.Timer(CANCEL_GRACE, self._cancel_guard)
            guard.daemon = True
            guard.start()

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: switch to post-copy at the end of the current pass. Raises
        MigrationError in QEMU's words when the capability is off or the migration has not started."""
        if self.postcopy is None:
            raise MigrationError("Enable postcopy with migrate_set_capability before the start of migration")
        if self.status.state == state.NONE:
            raise MigrationError("Postcopy must be started after migration has been started")
        self.postcopy.request()

    def resume(self, connector: Connector) -> None:
        """``migrate URI resume=true``: reconnect a migration in ``postcopy-paused`` through
        ``connector`` (MigrationError in QEMU's words otherwise)."""
        if self.postcopy is None or self.status.state != state.POSTCOPY_PAUSED:
            raise MigrationError("Cannot resume if there is no paused migration")
        self.postcopy.resume(connector)

    def _cancel_guard(self) -> None:
        if not self._done.is_set():
            self._shutdown_sockets()

    def channel_failed(self, cid: int, exc: BaseException) -> None:
        """A channel thread failed: keep the first failure (naming the channel), stop the others."""
        self._failure.record(exc, f"multifd channel {cid}")
        self._stop.set()
        self._shutdown_sockets(main=False)

    def run(self) -> MigrationStats:
        self.meter.start()
        self.stats.start = time.monotonic()
        hasher = threading.Thread(target=self._hash_loop, name="digest", daemon=True)
        try:
            self.status.step(state.SETUP)
            self._setup()
            hasher.start()
            self.stats.setup_time_ms = (time.monotonic() - self.stats.start) * 1000
            self.status.step(state.ACTIVE)
            self.stats.begin_active()
            self._iterate()
            if self.postcopy is not None and self.postcopy.switching:
                self.postcopy.run()
            else:
                self._complete()
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a status
            self._fail(exc)
        finally:
            self._done.set()
            self._teardown()
            if hasher.is_alive():
                hasher.join(timeout=5)
        return self.stats

    # --- phases ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        if self.stats.method == AUTO:
            resolve_auto(self)
        self.main = self.connector.connect(self.timeout)
        self._open_stream()
        self._open_channels()

    def _open_stream(self) -> None:
        """Header, configuration and livemig/config on the main channel, then the destination's Ready
        (a QEMU destination: :class:`.to_qemu.QemuSource`)."""
        assert self.main is not None
        self.rp = self.handover.rp = ReturnPath(self.main, "to-source", "destination")
        config = protocol.livemig_config(self.guest, self.params, self.uuid, self.method.name,
                                         postcopy=self.postcopy is not None)
        self._main_write(
            stream.file_header()
            + stream.configuration(MACHINE_TYPE)
            + stream.section_full(SECTION_CONFIG, "livemig/config", 0, 1)
            + stream.blob(json.dumps(config).encode())
            + stream.section_footer(SECTION_CONFIG),
            ram=False,
        )
        answer = self.rp.recv(self.timeout, self.handover.is_cancelled)
        if isinstance(answer, protocol.Refused):
            raise PeerFailed(f"destination refused the migration: {answer.error}")
        if not isinstance(answer, protocol.Ready):
            raise MigrationError(f"destination answered '{answer.TYPE}' to the configuration, expected 'ready'")
        if self.postcopy is not None:  # post-copy may follow: the destination checks it can serve faults
            self._main_write(stream.postcopy_advise(self.page_size, self.page_size), ram=False)

    def _open_channels(self) -> None:
        """Every multifd channel, then the RAM section's START: MEM_SIZE and the first flush."""
        for _ in range(self.params.multifd_channels):
            self._check()
            self.channels.add(self.connector.connect(self.timeout))
        self.stats.channels = [c.counters for c in self.channels.channels]
        self.guest.start_dirty_log()
        if self.throttling is not None:
            self.throttling.begin(time.monotonic(), self.stats.transferred)
        self._main_write(stream.section_start(SECTION_RAM, "ram", 0, 4) + stream.ram_mem_size(self._ram_blocks()))
        self._flush_round()
        self._main_write(stream.ram_eos() + stream.section_footer(SECTION_RAM))

    def _iterate(self) -> None:
        policy = Convergence(self.params.downtime_limit, self.params.max_passes)
        dirty = {b.name: np.arange(b.npages, dtype=np.int64) for b in self.guest.blocks}
        self.stats.dirty_sync_count = 1
        last_sync = time.monotonic()
        active_start = time.monotonic()
        moved = 0
        while True:
            self.stats.passes += 1
            self._main_write(stream.section_part(SECTION_RAM))
            moved += self._send_dirty(dirty)
            self._flush_round()
            self._main_write(stream.ram_eos() + stream.section_footer(SECTION_RAM))
            # the switchover's fixed cost, counted in the estimate: how far the destination lagged
            # behind what was written (waited out here, before the pause, not during the downtime)
            t_fixed = time.monotonic()
            self._catch_up()
            fixed_ms = (time.monotonic() - t_fixed) * 1000
            dirty = self._sync_dirty()
            now = time.monotonic()
            npages = sum(int(d.size) for d in dirty.values())
            self.stats.dirty_pages_rate = int(npages / max(1e-6, now - last_sync))
            last_sync = now
            self.stats.remaining = npages * self.page_size
            rate = moved / max(1e-6, now - active_start)
            self.stats.expected_downtime_ms = Convergence.expected_downtime_ms(npages, rate, fixed_ms)
            if self.throttling is not None:
                self.throttling.on_sync(now, npages, self.page_size, self.stats.transferred)
            self.meter.sample()
            if policy.should_switch(npages, rate, self.stats.passes, fixed_ms) or (
                    self.postcopy is not None and self.postcopy.should_switch(self.stats.passes)):
                self._pending = dirty
                return

    def _catch_up(self) -> None:
        """Wait until the destination processed everything written so far, so that the pause never
        finds it behind (its socket buffers, up to ~2 MiB per channel, can hold a whole small guest):
        PING on the main stream after the pass's flush, whose Pong comes once every channel's pages
        before its SYNC landed. (A QEMU destination: :class:`.to_qemu.QemuSource` waits for its
        kernel's acknowledgements instead.)"""
        self.ping_destination()

    def ping_destination(self, head: bytes = b"") -> None:
        """Write ``head`` (main-stream records) and a COMMAND PING, and wait for the destination's Pong:
        every record before it was processed. Before the pause only (nothing else reads the return
        path then). PeerFailed when the destination failed; MigrationError on another answer;
        TransportError when none comes within the timeout."""
        assert self.rp is not None
        self._pings += 1
        value = self._pings
        self._main_write(head + stream.ping(value), ram=False)
        msg = self.rp.recv(self.timeout, self.handover.is_cancelled)
        if isinstance(msg, protocol.Failed | protocol.Refused):
            raise PeerFailed(f"destination failed: {msg.error.removeprefix('destination: ')}")
        if not isinstance(msg, protocol.Pong) or msg.value != value:
            raise MigrationError(f"destination answered {msg} to PING {value}, expected pong {value}")

    def _pause(self) -> tuple[float, list[tuple[str, float]], dict[str, np.ndarray]]:
        """The switchover's start (precopy and post-copy): status device, guest paused, throttle off,
        no bandwidth cap (as QEMU, while the guest is stopped), the final dirty sync with the pending
        pages. Returns (pause time, downtime marks, block name -> pages still to send)."""
        self.status.step(state.DEVICE)
        self.stats.end_active()
        t_pause = time.monotonic()
        self.handover.switchover()
        self._stop_throttle()
        self._running_bytes = False
        self.limiter.set_rate(0)
        marks = [("pause", time.monotonic())]
        final = self._sync_dirty()
        for name, idx in self._pending.items():
            final[name] = merge_pages(final.get(name, idx[:0]), idx)
        marks.append(("sync", time.monotonic()))
        return t_pause, marks, final

    def _complete(self) -> None:
        t_pause, marks, final = self._pause()
        self._main_write(stream.section_end(SECTION_RAM))
        npages = self._send_dirty(final)
        if npages or self.FINAL_SYNC_ALWAYS:  # else the last pass's flush already ordered every page
            self._flush_round()
        self._main_write(stream.ram_eos() + stream.section_footer(SECTION_RAM))
        marks.append((f"send {npages} pages", time.monotonic()))
        answer = self._hand_over(marks)
        now = marks[-1][1]
        self.stats.downtime_ms = (now - t_pause) * 1000
        self.stats.downtime_phases = downtime_phases(t_pause, marks)
        self.stats.total_time_ms = (now - self.stats.start) * 1000
        self.stats.remaining = 0
        self.stats.send_cpu_percent = self.meter.cpu_percent()
        self.stats.send_mem_bytes = self.meter.mem_bytes()
        self.stats.recv_cpu_percent = float(answer.pop("recv-cpu-percent", None) or 0.0)
        self.stats.recv_mem_bytes = int(answer.pop("recv-mem-bytes", None) or 0)
        self.stats.destination = dict(answer)
        # before the status says completed: a query-migrate that sees it must see the outcome too
        self.stats.handover = self.handover.state
        self.stats.source_guest = self.handover.guest_state
        self.status.step(state.COMPLETED)
        if self.dump_ram:
            self._dump(self.dump_ram)
        if self.wait_report:
            assert self.rp is not None
            try:
                report = self.rp.recv(self.wait_report + self.timeout)
                if not isinstance(report, protocol.Report):
                    raise MigrationError(f"destination sent '{report.TYPE}' instead of its report")
                self.stats.destination.update(report.stats)
            except MigrationError as exc:
                self.stats.destination["report-error"] = str(exc)

    def _hand_over(self, marks: list[tuple[str, float]]) -> dict[str, Any]:
        """Guest state, digests and EOF, then livemig's commit; returns the destination's Resumed
        counters. Appends its phases to ``marks``, the last one when the destination answered."""
        blob = self.guest.save_state()
        marks.append(("save state", time.monotonic()))
        digests = {name: d.digest(self.full_verify) for name, d in self.digests.items()}
        marks.append(("digest", time.monotonic()))
        self._main_write(
            stream.section_full(SECTION_VCPU, "livemig/vcpu", 0, 1)
            + stream.blob(blob)
            + stream.section_footer(SECTION_VCPU)
            + stream.section_full(SECTION_DIGEST, "livemig/digest", 0, 1)
            + stream.blob(json.dumps({"algorithm": protocol.DIGEST_ALGORITHM, "blocks": digests}).encode())
            + stream.section_footer(SECTION_DIGEST)
            + stream.eof(),
            ram=False,
        )
        self.handover.commit(digests, xxhash.xxh3_128(blob).hexdigest(), self.timeout)
        marks.append(("destination prepared, commit", time.monotonic()))
        answer = self.handover.resumed(self.timeout).stats
        marks.append(("destination resumed", time.monotonic()))
        return dict(answer)

    # --- pieces ----------------------------------------------------------------------------------
    def _wire_block(self, name: str) -> str:
        """The name multifd packets give the guest's RAM block ``name`` (the destination's own block)."""
        return name

    def _ram_blocks(self) -> list[tuple[str, int]]:
        """MEM_SIZE's list: (block id, used length in bytes) of every block the destination has."""
        return [(b.name, b.size) for b in self.guest.blocks]

    def _send_dirty(self, dirty: dict[str, np.ndarray]) -> int:
        """Queue every dirty page, in packets of one block; returns the pages queued."""
        total = sum(int(d.size) for d in dirty.values())
        after = total  # pages of the blocks after the current one
        for block in self.guest.blocks:
            idx = dirty.get(block.name)
            if idx is None or idx.size == 0:
                continue
            after -= int(idx.size)

            def left(n: int, after: int = after) -> None:
                self.stats.remaining = (after + n) * self.page_size

            self.channels.queue_pages(self._wire_block(block.name), idx, self.page_count, left)
        return total

    def _flush_round(self) -> None:
        """SYNC on every channel, each written, then the main stream's MULTIFD_FLUSH."""
        self.channels.flush()
        self._main_write(stream.ram_multifd_flush())

    def _sync_dirty(self) -> dict[str, np.ndarray]:
        dirty = self.guest.sync_dirty_log()
        self.stats.dirty_sync_count += 1
        for name, idx in dirty.items():
            self.digests[name].mark_pages(idx)
        return dirty

    def _stop_throttle(self) -> None:
        if self.throttling is not None:
            self.throttling.stop()

    def _main_write(self, data: bytes, ram: bool = True) -> None:
        assert self.main is not None
        self._check()
        self.limiter.acquire(len(data))
        try:
            n = send_buffers(self.main, [data], "main channel")
        except MigrationError:
            self.handover.at_boundary = False  # a record went out in part: no Abort may follow it
            raise
        self.stats.main_bytes += n
        if ram:
            if self._running_bytes:
                self.stats.precopy_bytes += n
            else:
                self.stats.downtime_bytes += n

    def _check(self) -> None:
        self._failure.check()
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def _hash_loop(self) -> None:
        """Keep chunk digests fresh while the migration runs, a slice at a time: the chunks the dirty
        log marked. Not during the first pass: its packets cover every chunk whole, and the channels
        hash each as they send it (:meth:`~livemig.ram.digest.ChunkDigest.cover`)."""
        while not self._done.is_set() and self.status.state in (state.ACTIVE, state.SETUP):
            did = sum(d.refresh(limit=16) for d in self.digests.values()) if self.stats.passes > 1 else 0
            time.sleep(0.002 if did else 0.05)

    def _on_status(self, new: str) -> None:
        self.stats.status = new
        if self.on_progress:
            self.on_progress(self.stats)

    def _fail(self, exc: BaseException) -> None:
        """End in cancelled (a cancel before the commit point) or failed; the handover's table says
        what the guest does (running again before the commit point, stopped after it)."""
        self._stop.set()  # channel threads still waiting in the limiter give up
        self._stop_throttle()  # before the guest runs on and the status says so (not in the teardown)
        self.stats.end_active()
        err = self._failure.error or exc
        try:
            self.handover.fail(err)
        except MigrationError as resume_exc:
            self.stats.guest["resume-error"] = str(resume_exc)
        cancelled = self.handover.state == protocol.S_CANCELLED
        if cancelled:
            self.stats.error = "migration cancelled"
        else:
            peer = "" if self._cancel.is_set() else self.handover.peer_reason(err)
            self.stats.error = failure_text(str(err) or type(err).__name__, peer)
            if self.handover.state == protocol.S_UNKNOWN or (self.postcopy is not None and self.postcopy.ran):
                self.stats.error = f"{self.handover.unknown_advice} ({self.stats.error})"
        self.stats.total_time_ms = (time.monotonic() - self.stats.start) * 1000
        self.stats.send_cpu_percent = self.meter.cpu_percent()
        self.stats.send_mem_bytes = self.meter.mem_bytes()
        if cancelled:
            self.status.try_step(state.CANCELLING)
            self.status.try_step(state.CANCELLED)
        else:
            self.status.try_step(state.FAILED)
        if cancelled:
            self.handover.await_abort_ack()
        self._shutdown_sockets()

    def _note(self, text: str) -> None:
        """What the operator must know about the handover (a cancel too late, an unknown outcome)."""
        self.stats.notes.append(text)
        self.log(text)

    def _shutdown_sockets(self, main: bool = True) -> None:
        self.channels.shutdown()
        if main and self.main is not None:
            try:
                self.main.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _teardown(self) -> None:
        self._stop_throttle()
        self.channels.stop()
        if self.status.state != state.COMPLETED:
            self._shutdown_sockets()
        self.channels.close()
        if self.main is not None:
            self.main.close()
        try:
            self.guest.stop_dirty_log()
        except MigrationError:
            pass
        self.stats.status = self.status.state
        self.stats.handover = self.handover.state
        self.stats.source_guest = self.handover.guest_state

    def _dump(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for b in self.guest.blocks:
            with open(os.path.join(directory, f"src-{b.name}.bin"), "wb") as f:
                f.write(self.views[b.name])

    def query(self) -> dict[str, Any]:
        """query-migrate, now."""
        return self.stats.to_qapi()
