"""The destination side: accept the channels, apply RAM, check it, resume the guest on Commit.

Connections are greeted by a :class:`~.accept.Gate` (one thread each, a deadline for the first
bytes; strangers are logged and dropped). A main channel becomes *the* main channel only once its
livemig/config is accepted (:meth:`Destination._configure`: uuid, protocol version, parameters,
guest); a refused one is answered Refused and dropped, and the destination waits on, for its first
main channel without a time limit (as QEMU's ``-incoming``), until cancelled. The main channel is read by a sans-IO
:class:`~livemig.wire.stream.StreamReader`; each multifd channel has a receive thread
(:class:`~livemig.migration.multifd.RecvChannel`) that validates every packet header before a single
byte lands in guest RAM. SYNC packets meet the main stream's MULTIFD_FLUSH at a barrier, so a
re-sent page never lands before an older copy (docs/wire.md, "Main stream").

At the stream's EOF every RAM block's digest must match the source's and the state blob must load;
then the destination answers Prepared (its digests) and waits for the source's Commit
(:mod:`.protocol`). Only a Commit resumes the guest; a failure, a timeout, a lost link or an Abort
before it discards the guest, which never runs.
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
from ..compress.qatzip import hardware_probe
from ..errors import Cancelled, IntegrityError, MigrationError, TransportError, WireError, os_reason
from ..guest import Guest
from ..guest.base import RamBlock
from ..params import MigrationParameters
from ..ram.digest import ChunkDigest
from ..transport.address import Address
from ..transport.sockets import AddressListener, Listener
from ..wire import stream
from ..wire.constants import MIG_CMD_PING, PAGE_SIZE
from . import protocol, state
from .accept import Gate
from .configure import apply_config
from .from_qemu import QemuIncoming, admit_qemu
from .handover import DestinationHandover, ReturnPath
from .multifd import RecvChannel, RecvContext
from .multifd_send import PROGRESS_BYTES
from .postcopy_dest import COMMANDS as POSTCOPY_COMMANDS
from .postcopy_dest import PostcopyDestination
from .protocol import MACHINE_TYPE
from .stats import ResourceMeter, host_memory_limit


class Stalled(MigrationError):
    """Less than a page came from the source within the timeout. Not a lost link (the handover's
    ``link-lost``): the link may well be up, so the destination tells the source why (Failed)."""


#: at most this many seconds for a connection's first bytes (less when the timeout is shorter)
FIRST_BYTES = 5.0


class Destination:
    """Listens at ``address`` (an Address, or any Listener, e.g. an in-memory
    :class:`~livemig.transport.sockets.SocketPairLink`) and receives one migration.

    ``guest`` may be created ahead (as QEMU's destination is, from its own command line; RAM then
    prefaulted before the migration starts) or left None to create it from the source's config, if
    it needs at most ``max_memory`` bytes (default :func:`~.stats.host_memory_limit`).
    ``run()`` returns the result dict (``status`` completed/failed, ``resumed``, ``handover``,
    ``guest``, timings, CPU, memory, workload).
    """

    def __init__(
        self,
        address: Address | Listener,
        params: MigrationParameters,
        *,
        guest: Guest | None = None,
        uuid: bytes = bytes(16),
        timeout: float = 30.0,
        run_after: float = 0.0,
        dump_ram: str | None = None,
        full_verify: bool = False,
        max_memory: int | None = None,
        postcopy_ram: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        params.check()
        self.params = params
        self.guest = guest
        self.uuid = uuid
        self.timeout = timeout
        self.run_after = run_after
        self.dump_ram = dump_ram
        self.full_verify = full_verify
        self.max_memory = host_memory_limit() if max_memory is None else max_memory
        self.log = log or (lambda _m: None)
        self.page_size = PAGE_SIZE
        # auto: the source's pick replaces ``none`` when its config arrives (:func:`.configure.adopt_method`)
        auto = params.multifd_compression == AUTO
        self.method: Method = create_method("none" if auto else params.multifd_compression, params.level(),
                                            self.page_size)
        if auto:
            # the pick may be qatzip, created on a connection thread: probe libqatzip now, where its
            # "Cannot open /dev/vfio" can still be silenced (libqatzip.quiet_stderr: main thread only)
            hardware_probe()
        self.listener: Listener = (
            AddressListener(address, max(8, params.multifd_channels + 1)) if isinstance(address, Address) else address
        )
        #: the TCP port listened on (0 when not TCP)
        self.port = self.listener.port
        self.blocks: dict[str, RamBlock] = {}
        self.views: dict[str, memoryview] = {}
        self.received: dict[str, np.ndarray] = {}
        self.digests: dict[str, ChunkDigest] = {}
        self.channels: dict[int, RecvChannel] = {}
        self._recv = RecvContext(
            page_size=self.page_size,
            method=self.method,
            blocks=self.blocks,
            views=self.views,
            received=self.received,
            digests=self.digests,
            alive=self.alive,
            progress=self._progress,
            sync=self.channel_sync,
            failed=self.fail,
        )
        #: capability postcopy-ram (docs/postcopy.md): its half of the migration (None: off)
        self.postcopy = PostcopyDestination(self) if postcopy_ram else None
        self._recv.landed = self.postcopy.landed if self.postcopy is not None else None
        self.gate = Gate(self.listener, machine_type=MACHINE_TYPE, uuid=uuid, channels=params.multifd_channels,
                         first_bytes=min(timeout, FIRST_BYTES), timeout=timeout, log=self.log,
                         on_main=self._configure, on_channel=self._add_channel,
                         on_qemu=lambda machine: admit_qemu(self, machine))
        self.handover = DestinationHandover(lambda: self.guest, self._resumed_stats, self.log)
        self.main: socket.socket | None = None
        self.meter = ResourceMeter()
        self._failure = state.FirstFailure()
        self._barrier = threading.Barrier(params.multifd_channels + 1)
        self._guest_ready = threading.Event()
        self._all_channels = threading.Event()
        self._done = threading.Event()
        #: when the migration last made progress: PROGRESS_BYTES arrived (see :meth:`_progress`)
        self.last_progress = time.monotonic()
        self._progress_bytes = 0
        self._progress_lock = threading.Lock()
        self._t_first = time.monotonic()
        self._stream_done = False
        self._main_view = memoryview(bytearray(1 << 16))
        self._hasher = threading.Thread(target=self._hash_loop, name="digest", daemon=True)
        self._hashing = threading.Event()
        self._hashing.set()

    @property
    def postcopy_status(self) -> str:
        """``postcopy-active``, ``postcopy-paused`` or ``postcopy-recover`` while post-copy runs here,
        else "" (the incoming side's part of query-migrate's status)."""
        return self.postcopy.status if self.postcopy is not None else ""

    def recover(self, listener: Listener) -> None:
        """``migrate-recover URI``: listen on ``listener`` for the source of a paused post-copy
        migration (MigrationError in QEMU's words unless post-copy is paused here)."""
        if self.postcopy is None or self.postcopy.status != state.POSTCOPY_PAUSED:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        self.postcopy.recover(listener)

    # --- errors ----------------------------------------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> None:
        """Fail the migration: keep the first failure (``where: reason``, the original as its cause),
        wake every thread that waits on a channel."""
        if self.postcopy is not None and self.postcopy.ran and where.startswith("multifd channel"):
            return  # they carry nothing after the switch; a broken link pauses post-copy instead
        self._failure.record(exc, where)
        self._barrier.abort()
        for ch in list(self.channels.values()):
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.main is not None:
            try:  # wake the main thread's read; keep the write side for the error report
                self.main.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def _check(self) -> None:
        self._failure.check()

    def cancel(self, reason: str = "incoming migration cancelled") -> None:
        """End :meth:`run` from any thread (it returns a failed result; a guest not yet resumed is
        discarded). Before a source connected this is the only way the wait ends."""
        self.fail(Cancelled(reason), "destination")

    def _watchdog(self) -> None:
        """Fail the migration when it made no progress (:meth:`_progress`) for ``timeout`` seconds: a
        stalled peer, or one dribbling less than a page per timeout."""
        while not self._done.wait(0.25) and not self._stream_done:
            if self._failure.error is None and time.monotonic() - self.last_progress > self.timeout:
                self.fail(Stalled(f"no progress from the source for {self.timeout:g} s (less than "
                                         f"{PROGRESS_BYTES} bytes arrived)"), "destination")
                return

    def _progress(self, nbytes: int) -> None:
        """``nbytes`` more arrived on some channel (main or multifd, any thread). Progress is measured
        in bytes: the stall timer restarts once at least :data:`~.multifd.PROGRESS_BYTES` (one page)
        arrived since it last restarted, so a slow cap keeps the migration alive and a peer sending
        a byte now and then does not."""
        with self._progress_lock:
            self._progress_bytes += nbytes
            if self._progress_bytes >= PROGRESS_BYTES:
                self._progress_bytes = 0
                self.last_progress = time.monotonic()

    def _restart_timer(self) -> None:
        """Local work (creating the guest) took a while: the peer gets a whole timeout again."""
        with self._progress_lock:
            self._progress_bytes = 0
            self.last_progress = time.monotonic()

    def alive(self) -> bool:
        """True while the migration made progress (:meth:`_progress`) within the timeout."""
        return self._failure.error is None and time.monotonic() - self.last_progress < self.timeout

    def channel_sync(self, cid: int) -> None:
        try:
            self._barrier.wait()  # no timeout: the watchdog aborts the barrier when nothing moves
        except threading.BrokenBarrierError:
            self._check()
            raise TransportError("multifd sync abandoned (another channel or the main stream failed)") from None

    # --- run -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Receive one migration; the result says what the guest does (``resumed``, ``guest``)."""
        result: dict[str, Any] = {"status": "failed"}
        self.gate.start()
        hasher = self._hasher
        try:
            while not self.gate.main_ready.wait(0.05):  # no limit: a source may come any time
                self._check()
            self.main, reader = self.gate.main, self.gate.main_reader
            assert self.main is not None and reader is not None
            self.meter.start()
            self._t_first = time.monotonic()
            if self.gate.qemu_machine is not None:  # a QEMU source: RAM only, no guest resumes
                result = QemuIncoming(self, reader, self.gate.qemu_machine).run()
                return result
            rp = self.handover.rp = ReturnPath(self.main, "to-destination", "source")
            rp.send(protocol.Ready())
            hasher.start()
            self._restart_timer()
            threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
            self._receive_main(reader)
            self._stream_done = True
            if self.postcopy is None or not self.postcopy.ran:
                self.handover.await_commit(self.timeout)
            result = self._finish()
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a result
            self.fail(exc, "destination")
            err = self._failure.error or exc
            result = {"status": "failed", "error-desc": str(err)}
            if self.gate.qemu_machine is None:
                self.handover.fail(err)
            else:  # a QEMU source: there is no guest here to discard
                result.update(source="qemu", resumed=False, guest="not-run")
        finally:
            self._done.set()
            self._close()
            result.setdefault("resumed", self.handover.running)
            result.setdefault("handover", self.handover.h.state)
            result.setdefault("guest", self.handover.h.guest)
        return result

    def _refused_note(self) -> str:
        return f" (last refused connection: {self.gate.last_refusal})" if self.gate.last_refusal else ""

    def _add_channel(self, sock: socket.socket, cid: int) -> None:
        """A greeted multifd channel: start receiving once the guest exists."""
        try:
            if not self._guest_ready.wait(timeout=self.timeout * 4):
                raise TransportError("connected but the guest was never set up")
            self._check()
            ch = RecvChannel(self._recv, cid, sock)
            self.channels[cid] = ch
            ch.start()
            if len(self.channels) == self.params.multifd_channels:
                self._all_channels.set()
        except BaseException as exc:  # noqa: BLE001 - reported as the migration's failure
            sock.close()
            self.fail(exc, f"multifd channel {cid}")

    def _receive_main(self, reader: stream.StreamReader) -> None:
        """Read the main stream after its CONFIGURATION (the gate read that far) up to EOF, then
        verify RAM, load the state and answer Prepared. Progress counts the bytes read, as on the
        multifd channels (:meth:`_progress`): small records dribbled in never reset the watchdog."""
        state_blob: bytes | None = None
        src_digests: dict[str, str] | None = None
        ram_seen = False
        while True:
            ev = self.next_event(reader)
            if isinstance(ev, stream.Blob):
                if ev.idstr == "livemig/vcpu":
                    state_blob = bytes(ev.data)
                elif ev.idstr == "livemig/digest":
                    src_digests = self._source_digests(ev.data)
                else:
                    raise WireError("unknown livemig section", ev.idstr, "livemig/vcpu or livemig/digest")
            elif isinstance(ev, stream.MemSize):
                if not self._guest_ready.is_set():
                    raise WireError("RAM section before livemig/config", "ram", "livemig/config first")
                mine = [(b.name, b.size) for b in self.guest.blocks] if self.guest else []
                if list(ev.blocks) != mine:
                    raise WireError("RAM block list", list(ev.blocks), mine)
                ram_seen = True
            elif isinstance(ev, stream.MultifdFlush):
                self.meet_channels()
            elif isinstance(ev, stream.ZeroPage | stream.Page):
                self.apply_page(ev)
            elif isinstance(ev, stream.Command):
                self._command(ev)
            elif isinstance(ev, (*POSTCOPY_COMMANDS, stream.PostcopyRun)):
                if self.postcopy is None:
                    raise WireError("main stream: post-copy command", type(ev).__name__,
                                    "none: postcopy-ram is off on this destination")
                if not isinstance(ev, stream.PostcopyRun):
                    self.postcopy.command(ev)
                    continue
                self.postcopy.run(state_blob)
                self.postcopy.receive_rest(reader)  # the rest of the stream, and its completion
                return
            elif isinstance(ev, stream.Eof):
                break
            elif isinstance(ev, stream.ControlLine):  # the source's Abort, before the stream's end
                self.handover.control(ev.data, self.timeout)
        if not ram_seen or state_blob is None or src_digests is None:
            raise WireError("incomplete migration stream", "EOF", "RAM, livemig/vcpu and livemig/digest sections")
        if reader.buffered:
            raise WireError("bytes after the main stream's EOF, before Prepared", reader.buffered, 0)
        digests = self._verify(src_digests)
        assert self.guest is not None
        self.guest.load_state(state_blob)
        if self.dump_ram:
            self._dump(self.dump_ram)
        self.handover.prepared(digests, xxhash.xxh3_128(state_blob).hexdigest())

    def next_event(self, reader: stream.StreamReader, closed_ok: bool = False) -> stream.Event:
        """The main stream's next event, reading the main channel as needed (its bytes count as
        progress). A close is a TransportError, or with ``closed_ok`` fed to the reader, which
        decides (a QEMU source may end its stream by closing)."""
        assert self.main is not None
        while True:
            ev = reader.next_event()
            if ev is not stream.NEED_DATA:
                return ev
            self._check()
            try:
                n = self.main.recv_into(self._main_view)
            except TimeoutError as exc:
                if self.alive():
                    continue  # a long pass: the channels are busy, the main stream waits for its flush
                raise Stalled(f"no progress on any channel for {self.timeout:g} s") from exc
            except OSError as exc:
                raise TransportError(f"main channel failed: {os_reason(exc)}") from exc
            if n == 0 and not closed_ok:
                raise TransportError("main channel closed before the end of the migration stream")
            reader.feed(self._main_view[:n])
            self._progress(n)

    def _command(self, ev: stream.Command) -> None:
        """COMMAND PING: answer Pong now, every record before it processed (QEMU's PONG); the
        source waits for it after each pass, and before post-copy's pause. Other commands are not
        sent by livemig's sources outside post-copy, and are ignored."""
        if ev.cmd == MIG_CMD_PING and self.handover.rp is not None:
            self.handover.rp.send(protocol.Pong(int.from_bytes(ev.data, "big")))

    def meet_channels(self) -> None:
        """A sync point of the main stream: wait for one SYNC on every multifd channel, release them."""
        self._wait_channels()
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            self._check()
            raise TransportError("multifd channels did not reach the sync point") from None

    def apply_page(self, ev: stream.ZeroPage | stream.Page) -> None:
        """A page (or zero page) sent on the main channel."""
        block = self.blocks[ev.block]
        p = ev.offset // self.page_size
        if isinstance(ev, stream.Page):
            block.pages[p] = np.frombuffer(ev.data, dtype=np.uint8)
        else:
            block.pages[p] = 0
        self.received[ev.block][p] = True
        self.digests[ev.block].mark_pages(np.array([p]))
        if self.postcopy is not None:
            self.postcopy.landed_main(ev)

    @staticmethod
    def _source_digests(data: bytes | memoryview) -> dict[str, str]:
        try:
            obj = json.loads(bytes(data))
            algorithm, blocks = obj["algorithm"], obj["blocks"]
        except (ValueError, KeyError, TypeError) as exc:
            raise WireError(f"livemig/digest section is malformed: {exc}") from exc
        if algorithm != protocol.DIGEST_ALGORITHM or not isinstance(blocks, dict):
            raise WireError("livemig/digest algorithm", algorithm, protocol.DIGEST_ALGORITHM)
        return {str(k): str(v) for k, v in blocks.items()}

    def _wait_channels(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._all_channels.wait(timeout=0.05):
            self._check()
            if time.monotonic() > deadline:
                raise TransportError(f"only {len(self.channels)} of {self.params.multifd_channels} multifd "
                                     f"channels connected" + self._refused_note())

    def _configure(self, data: bytes) -> None:
        """A would-be main channel's livemig/config (on its greeter thread, one at a time): accept it
        (create the guest from it when none was given, set up the receive state) or raise
        MainRefusal with the reason. A refused config leaves nothing behind: a guest created from it
        is closed and forgotten."""
        created = self.guest is None
        try:
            apply_config(self, data)
        except BaseException:  # MainRefusal: the gate answers and logs it
            self._forget(created)
            raise

    def _forget(self, created: bool) -> None:
        if created and self.guest is not None:
            self.guest.close()
            self.guest = None
        self.blocks.clear()
        self.views.clear()
        self.received.clear()
        self.digests.clear()

    def _verify(self, src: dict[str, str]) -> dict[str, str]:
        """This side's digest of each RAM block, checked against the source's; IntegrityError if one differs."""
        out: dict[str, str] = {}
        for name, d in self.digests.items():
            out[name] = mine = d.digest(self.full_verify)
            if src.get(name) != mine:
                raise IntegrityError(
                    f"RAM block '{name}' digest mismatch: source {src.get(name)}, destination {mine}; guest not started"
                )
        extra = set(src) - set(self.digests)
        if extra:
            raise IntegrityError(f"source sent digests for unknown RAM blocks {sorted(extra)}")
        return out

    def _dump(self, directory: str) -> None:
        assert self.guest is not None
        os.makedirs(directory, exist_ok=True)
        for b in self.guest.blocks:
            with open(os.path.join(directory, f"dst-{b.name}.bin"), "wb") as f:
                f.write(self.views[b.name])

    def _resumed_stats(self) -> protocol.Stats:
        """The Resumed message's counters, taken when the guest resumed."""
        return {
            "progress_at_resume": self.handover.progress_at_resume,
            "recv-cpu-percent": round(self.meter.cpu_percent(), 1),
            "recv-mem-bytes": self.meter.mem_bytes(),
            "recv-wall-ms": round((time.monotonic() - self._t_first) * 1000),
            "recv-packets": sum(c.counters.packets for c in self.channels.values()),
            "recv-wire-bytes": sum(c.counters.wire_bytes for c in self.channels.values()),
            "recv-codec-cpu-s": round(sum(c.counters.codec_seconds for c in self.channels.values()), 3),
            "recv-hashed-bytes": sum(d.hashed * d.chunk_bytes for d in self.digests.values()),
        }

    def _finish(self) -> dict[str, Any]:
        """After the guest resumed: the result, and with ``run_after`` its report to the source."""
        assert self.guest is not None and self.handover.rp is not None
        result: dict[str, Any] = {"status": "completed", **self._resumed_stats()}
        if self.postcopy is not None and self.postcopy.ran:
            result["postcopy"] = self.postcopy.figures()
        if self.run_after:
            time.sleep(self.run_after)
            report: protocol.Stats = {"progress_after": self.guest.progress()}
            try:
                self.guest.check_workload()
                report["workload_check"] = "ok"
            except MigrationError as exc:
                report["workload_check"] = str(exc)
            try:
                self.handover.rp.send(protocol.Report(report))
            except MigrationError:
                pass
            result.update(report)
        return result

    def stop_hashing(self) -> None:
        """End the digest loop (post-copy's LISTEN: it reads guest RAM) and wait until it has."""
        self._hashing.clear()
        if self._hasher.is_alive():
            self._hasher.join()

    def _hash_loop(self) -> None:
        # with post-copy on, small slices: a switch to post-copy waits for the slice in hand
        limit = 64 if self.postcopy is None else 4
        while not self._done.is_set() and self._hashing.is_set():
            did = sum(d.refresh(limit=limit, settled=True) for d in list(self.digests.values()))
            time.sleep(0.005 if did else 0.02)

    def _close(self) -> None:
        if self.postcopy is not None:
            self.postcopy.stop()
        self.gate.close()
        for ch in list(self.channels.values()):
            ch.join(timeout=2)
            ch.sock.close()
        if self.main is not None:
            self.main.close()
