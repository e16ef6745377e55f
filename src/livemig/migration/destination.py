"""The destination side: accept the channels, apply RAM, check it, resume the guest.

The main channel is read by a sans-IO :class:`~livemig.wire.stream.StreamReader`; each multifd
channel has a receive thread (:class:`~livemig.migration.multifd.RecvChannel`) that validates every
packet header before a single byte lands in guest RAM. SYNC packets meet the main stream's
MULTIFD_FLUSH at a barrier, so a re-sent page never lands before an older copy (docs/wire.md,
"Main stream").

The guest is only resumed when every RAM block's digest matches the source's and its state blob
loaded; otherwise the destination reports failed and the guest never runs.
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

from ..compress import Method, create_method
from ..errors import IntegrityError, MigrationError, TransportError, WireError
from ..guest import Guest, GuestConfig, create_guest
from ..guest.base import RamBlock
from ..params import MigrationParameters
from ..ram.digest import ChunkDigest
from ..transport.address import Address
from ..transport.secure import secure_accepted
from ..transport.sockets import AddressListener, LineChannel, Listener, recv_exact_into
from ..units import format_size
from ..wire import handshake, stream
from ..wire.constants import MULTIFD_MAGIC, PAGE_SIZE, QEMU_VM_FILE_MAGIC
from . import state
from .multifd import RecvChannel, RecvContext
from .source import MACHINE_TYPE
from .stats import ResourceMeter


class Destination:
    """Listens at ``address`` (an Address, or any Listener, e.g. an in-memory
    :class:`~livemig.transport.sockets.SocketPairLink`) and receives one migration.

    ``guest`` may be created ahead (as QEMU's destination is, from its own command line; RAM then
    prefaulted before the migration starts) or left None to create it from the source's config.
    ``run()`` returns the result dict (``status`` completed/failed, timings, CPU, memory, workload).
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
        self.log = log or (lambda _m: None)
        self.page_size = PAGE_SIZE
        self.method: Method = create_method(params.multifd_compression, params.level(), self.page_size)
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
            progress=self._touch,
            sync=self.channel_sync,
            failed=self.fail,
        )
        self.main: socket.socket | None = None
        self.meter = ResourceMeter()
        self._failure = state.FirstFailure()
        self._barrier = threading.Barrier(params.multifd_channels + 1)
        self._guest_ready = threading.Event()
        self._all_channels = threading.Event()
        self._done = threading.Event()
        self.last_progress = time.monotonic()
        self._stream_done = False

    # --- errors ----------------------------------------------------------------------------------
    def fail(self, exc: BaseException, where: str) -> None:
        """Fail the migration: keep the first failure (``where: reason``, the original as its cause),
        wake every thread that waits on a channel."""
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

    def _watchdog(self) -> None:
        """Fail the migration when no channel has moved for ``timeout`` seconds (a stalled peer)."""
        while not self._done.wait(0.25) and not self._stream_done:
            if self._failure.error is None and time.monotonic() - self.last_progress > self.timeout:
                self.fail(TransportError(f"no data from the source for {self.timeout:.0f} s"), "destination")
                return

    def _touch(self) -> None:
        self.last_progress = time.monotonic()

    def alive(self) -> bool:
        """True while some channel delivered a packet within the timeout."""
        return self._failure.error is None and time.monotonic() - self.last_progress < self.timeout

    def channel_sync(self, cid: int) -> None:
        try:
            self._barrier.wait()  # no timeout: the watchdog aborts the barrier when nothing moves
        except threading.BrokenBarrierError:
            self._check()
            raise TransportError("multifd sync abandoned (another channel or the main stream failed)") from None

    # --- run -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        result: dict[str, Any] = {"status": "failed"}
        acceptor = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        acceptor.start()
        hasher = threading.Thread(target=self._hash_loop, name="digest", daemon=True)
        rp: LineChannel | None = None
        t_first = 0.0
        try:
            deadline = time.monotonic() + self.timeout * 4
            while self.main is None:
                self._check()
                if time.monotonic() > deadline:
                    raise TransportError(f"no main channel connected within {self.timeout * 4:.0f} s")
                time.sleep(0.005)
            self.meter.start()
            t_first = time.monotonic()
            rp = LineChannel(self.main)
            self.last_progress = time.monotonic()
            watchdog = threading.Thread(target=self._watchdog, name="watchdog", daemon=True)
            watchdog.start()
            self._receive_main(rp, hasher)
            self._stream_done = True
            result = self._finish(rp, t_first)
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a result
            self.fail(exc, "destination")
            err = str(self._failure.error)
            result = {"status": "failed", "error-desc": err, "resumed": False}
            if rp is not None:
                try:
                    rp.send({"status": "failed", "error": err})
                except MigrationError:
                    pass
        finally:
            self._done.set()
            self._close()
        return result

    def _accept_loop(self) -> None:
        """Classify connections by their first 4 bytes (QEMU >= 8.0 rule): QEVM = main, multifd magic."""
        while not self._done.is_set() and not self._all_channels.is_set():
            try:
                sock = self.listener.accept(0.1)
            except TransportError:
                return
            if sock is None:
                continue
            try:
                sock = secure_accepted(self.listener, sock, self.timeout)  # TLS: handshake + authz first
                sock.settimeout(self.timeout)
                head = b""
                deadline = time.monotonic() + self.timeout
                while len(head) < 4:
                    head = sock.recv(4, socket.MSG_PEEK)  # peek: the owner of the channel reads it again
                    if not head:
                        break
                    if len(head) < 4:
                        if time.monotonic() > deadline:
                            raise TransportError(f"connection sent {len(head)} bytes and no magic within "
                                                 f"{self.timeout:.0f} s")
                        time.sleep(0.001)
                if not head:  # connected and closed without a byte (a probe): not a migration peer
                    self.log("a connection closed before sending anything; still waiting")
                    sock.close()
                    continue
                magic = int.from_bytes(head[:4], "big")
                if magic == QEMU_VM_FILE_MAGIC:
                    if self.main is not None:
                        raise WireError("second main channel connection", hex(magic), "one main channel only")
                    self.main = sock
                elif magic == MULTIFD_MAGIC:
                    self._add_channel(sock)
                else:
                    raise WireError("unknown channel magic", hex(magic),
                                    f"{QEMU_VM_FILE_MAGIC:#x} (main) or {MULTIFD_MAGIC:#x} (multifd)")
            except BaseException as exc:  # noqa: BLE001
                sock.close()
                self.fail(exc, "incoming connection")
                return

    def _add_channel(self, sock: socket.socket) -> None:
        buf = memoryview(bytearray(handshake.INIT_SIZE))
        recv_exact_into(sock, buf, "MultiFDInit_t")
        init = handshake.decode_init(buf, expected_uuid=self.uuid, channels=self.params.multifd_channels)
        if init.channel_id in self.channels:
            raise WireError(f"multifd: received id '{init.channel_id}' already setup")
        if not self._guest_ready.wait(timeout=self.timeout * 4):
            raise TransportError("multifd channel connected but the guest was never set up")
        self._check()
        ch = RecvChannel(self._recv, init.channel_id, sock)
        self.channels[init.channel_id] = ch
        ch.start()
        if len(self.channels) == self.params.multifd_channels:
            self._all_channels.set()

    def _receive_main(self, rp: LineChannel, hasher: threading.Thread) -> None:
        assert self.main is not None
        reader = stream.StreamReader()
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        state_blob: bytes | None = None
        src_digests: dict[str, str] | None = None
        ram_seen = False
        while True:
            ev = reader.next_event()
            if ev is stream.NEED_DATA:
                self._check()
                try:
                    n = self.main.recv_into(view)
                except TimeoutError as exc:
                    if self.alive():
                        continue  # a long pass: the channels are busy, the main stream waits for its flush
                    raise TransportError(f"no progress on any channel for {self.timeout:.0f} s") from exc
                except OSError as exc:
                    raise TransportError(f"main channel failed: {exc}") from exc
                if n == 0:
                    raise TransportError("main channel closed before the end of the migration stream")
                reader.feed(view[:n])
                self.last_progress = time.monotonic()
                continue
            if isinstance(ev, stream.Configuration):
                if ev.machine_type != MACHINE_TYPE:
                    raise WireError("Machine type received", ev.machine_type, MACHINE_TYPE)
            elif isinstance(ev, stream.Blob):
                if ev.idstr == "livemig/config":
                    self._configure(ev.data, rp)
                    hasher.start()
                elif ev.idstr == "livemig/vcpu":
                    state_blob = bytes(ev.data)
                elif ev.idstr == "livemig/digest":
                    src_digests = json.loads(ev.data)["blocks"]
                else:
                    raise WireError("unknown livemig section", ev.idstr,
                                    "livemig/config, livemig/vcpu or livemig/digest")
            elif isinstance(ev, stream.MemSize):
                if not self._guest_ready.is_set():
                    raise WireError("RAM section before livemig/config", "ram", "livemig/config first")
                mine = [(b.name, b.size) for b in self.guest.blocks] if self.guest else []
                if list(ev.blocks) != mine:
                    raise WireError("RAM block list", list(ev.blocks), mine)
                ram_seen = True
            elif isinstance(ev, stream.MultifdFlush):
                self._wait_channels()
                try:
                    self._barrier.wait()
                except threading.BrokenBarrierError:
                    self._check()
                    raise TransportError("multifd channels did not reach the sync point") from None
            elif isinstance(ev, stream.ZeroPage | stream.Page):
                block = self.blocks[ev.block]
                p = ev.offset // self.page_size
                if isinstance(ev, stream.Page):
                    block.pages[p] = np.frombuffer(ev.data, dtype=np.uint8)
                else:
                    block.pages[p] = 0
                self.received[ev.block][p] = True
                self.digests[ev.block].mark_pages(np.array([p]))
            elif isinstance(ev, stream.Eof):
                break
        if not ram_seen or state_blob is None or src_digests is None:
            raise WireError("incomplete migration stream", "EOF", "RAM, livemig/vcpu and livemig/digest sections")
        self._verify(src_digests)
        assert self.guest is not None
        self.guest.load_state(state_blob)

    def _wait_channels(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._all_channels.wait(timeout=0.05):
            self._check()
            if time.monotonic() > deadline:
                raise TransportError(
                    f"only {len(self.channels)} of {self.params.multifd_channels} multifd channels connected"
                )

    def _configure(self, data: bytes | memoryview, rp: LineChannel) -> None:
        try:
            cfg = json.loads(bytes(data))
            gcfg = GuestConfig.from_json(json.dumps(cfg["guest"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise WireError(f"livemig/config section is malformed: {exc}") from exc
        mine = {
            "multifd-channels": self.params.multifd_channels,
            "multifd-compression": self.params.multifd_compression,
            "page-size": self.page_size,
        }
        for key, value in mine.items():
            if cfg.get(key) != value:
                err = f"{key} differs: source uses {cfg.get(key)!r}, destination {value!r}; set the same on both sides"
                rp.send({"status": "error", "error": err})
                raise MigrationError(err)
        try:
            if self.guest is None:
                self.log(f"creating the {gcfg.kind} guest from the source's config ({gcfg.memory} bytes)")
                self.guest = create_guest(gcfg, incoming=True)
            else:
                theirs = [tuple(b) for b in cfg.get("blocks", [])]
                ours = [(b.name, b.size) for b in self.guest.blocks]
                if theirs != ours or gcfg.kind != self.guest.config.kind:
                    def show(blocks: list[Any]) -> str:
                        return ", ".join(f"{name} {format_size(size)}" for name, size in blocks)
                    raise MigrationError(
                        f"guest differs: source has a {gcfg.kind} guest with RAM {show(theirs)}, "
                        f"destination a {self.guest.config.kind} guest with RAM {show(ours)}"
                    )
                self.guest.config = gcfg
        except MigrationError as exc:
            rp.send({"status": "error", "error": str(exc)})
            raise
        self.last_progress = time.monotonic()  # creating the guest may have taken a while
        for b in self.guest.blocks:
            self.blocks[b.name] = b
            self.views[b.name] = b.view()
            self.received[b.name] = np.zeros(b.npages, dtype=bool)
            self.digests[b.name] = ChunkDigest(self.views[b.name], self.page_size)
            self.digests[b.name].assume_zero()  # an incoming guest's RAM is zero (Guest contract)
        self._guest_ready.set()
        rp.send({"status": "ready"})

    def _verify(self, src: dict[str, str]) -> None:
        for name, d in self.digests.items():
            mine = d.digest(self.full_verify)
            if src.get(name) != mine:
                raise IntegrityError(
                    f"RAM block '{name}' digest mismatch: source {src.get(name)}, destination {mine}; guest not started"
                )
        extra = set(src) - set(self.digests)
        if extra:
            raise IntegrityError(f"source sent digests for unknown RAM blocks {sorted(extra)}")

    def _finish(self, rp: LineChannel, t_first: float) -> dict[str, Any]:
        assert self.guest is not None
        if self.dump_ram:
            os.makedirs(self.dump_ram, exist_ok=True)
            for b in self.guest.blocks:
                with open(os.path.join(self.dump_ram, f"dst-{b.name}.bin"), "wb") as f:
                    f.write(self.views[b.name])
        progress0 = self.guest.progress()
        self.guest.resume()
        wall = time.monotonic() - t_first
        result: dict[str, Any] = {
            "status": "resumed",
            "resumed": True,
            "progress_at_resume": progress0,
            "recv-cpu-percent": round(self.meter.cpu_percent(), 1),
            "recv-mem-bytes": self.meter.mem_bytes(),
            "recv-wall-ms": round(wall * 1000),
            "recv-packets": sum(c.counters.packets for c in self.channels.values()),
            "recv-wire-bytes": sum(c.counters.wire_bytes for c in self.channels.values()),
            "recv-codec-cpu-s": round(sum(c.counters.codec_seconds for c in self.channels.values()), 3),
            "recv-hashed-bytes": sum(d.hashed * d.chunk_bytes for d in self.digests.values()),
        }
        rp.send(result)
        if self.run_after:
            time.sleep(self.run_after)
            report: dict[str, Any] = {"status": "report", "progress_after": self.guest.progress()}
            try:
                self.guest.check_workload()
                report["workload_check"] = "ok"
            except MigrationError as exc:
                report["workload_check"] = str(exc)
            try:
                rp.send(report)
            except MigrationError:
                pass
            result.update(report)
        result["status"] = "completed"
        return result

    def _hash_loop(self) -> None:
        while not self._done.is_set():
            did = sum(d.refresh(limit=64, settled=True) for d in list(self.digests.values()))
            time.sleep(0.005 if did else 0.02)

    def _close(self) -> None:
        for ch in list(self.channels.values()):
            ch.join(timeout=2)
            ch.sock.close()
        if self.main is not None:
            self.main.close()
        self.listener.close()
