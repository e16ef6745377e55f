"""The source side of a precopy migration over multifd channels.

Linear code in :meth:`Source.run`, one thread per multifd channel, policy factored out
(:mod:`.convergence`). Sequence on the wire (qemu-multifd.md §4.4, per-round flush mode)::

    main:   QEVM header, configuration
            FULL livemig/config (guest config + parameters)   <- destination answers ready/error
    chans:  MultiFDInit_t on each of N channels
    main:   START ram: MEM_SIZE, [SYNC all channels] MULTIFD_FLUSH, EOS
            PART ram per pass: pages go on the channels; [SYNC all] MULTIFD_FLUSH, EOS
            -- guest paused: final dirty sync --
            END ram: last pages; [SYNC all] MULTIFD_FLUSH, EOS
            FULL livemig/vcpu (guest state blob), FULL livemig/digest (RAM block digests), EOF
    return: destination answers resumed/failed  -> downtime ends

Any failure or a cancel leaves the source guest running (resumed if it was paused) and the status
failed/cancelled with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compress import Buffer, Compressor, Method, create_method
from ..errors import Cancelled, MigrationError, TransportError
from ..guest import Guest
from ..guest.base import RamBlock
from ..params import MigrationParameters
from ..ram.digest import ChunkDigest
from ..ram.pages import chunks, runs
from ..transport.address import Address
from ..transport.ratelimit import RateLimiter
from ..transport.sockets import LineChannel, connect, send_buffers
from ..wire import handshake, packet, stream
from . import state
from .convergence import Convergence
from .stats import ChannelCounters, MigrationStats, ResourceMeter

MACHINE_TYPE = "livemig-1"
SECTION_CONFIG = 1
SECTION_RAM = 2
SECTION_VCPU = 3
SECTION_DIGEST = 4


@dataclass
class _Pages:
    """Up to BATCH consecutive packets of one block, sent with one vectored write."""

    block: RamBlock
    packets: list[tuple[np.ndarray, int]]


#: packets per channel job: fewer queue hand-offs and syscalls, same packets on the wire
BATCH = 4


@dataclass
class _Sync:
    num: int


_STOP = object()


def merge_pages(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted page index arrays."""
    if not a.size:
        return b
    if not b.size:
        return a
    return np.unique(np.concatenate((a, b)))


def _warm_numpy() -> None:
    """numpy loads some functions (np.unique among them) lazily: ~20 ms on first call. Pay that before
    the guest is paused, not during downtime."""
    merge_pages(np.arange(2), np.arange(1, 3))


def nonzero_pages(pages64: np.ndarray) -> np.ndarray:
    """Bool per page (rows of uint64 words): True where any byte is non-zero.

    Like QEMU's buffer_is_zero, it looks at the cheap part first: a page whose first 64 bytes are not
    all zero is non-zero without reading the rest; only the others are scanned whole.
    """
    nonzero: np.ndarray = np.asarray(pages64[:, :8].any(axis=1))
    rest = np.flatnonzero(~nonzero)
    if rest.size:
        nonzero[rest] = pages64[rest].any(axis=1)
    return nonzero


class _SendChannel(threading.Thread):
    """One multifd channel: zero detection, compression and sending, in packet order."""

    def __init__(self, src: Source, cid: int, sock: socket.socket, comp: Compressor) -> None:
        super().__init__(name=f"multifd-send-{cid}", daemon=True)
        self.src = src
        self.cid = cid
        self.sock = sock
        self.comp = comp
        self.q: queue.Queue[object] = queue.Queue(maxsize=4)
        self.synced = threading.Semaphore(0)
        self.counters = ChannelCounters()

    def run(self) -> None:
        try:
            init = handshake.encode_init(self.src.uuid, self.cid)
            self.counters.wire_bytes += send_buffers(self.sock, [init], f"multifd channel {self.cid} handshake")
            while True:
                job = self.q.get()
                if job is _STOP:
                    return
                if isinstance(job, _Sync):
                    data = packet.encode_sync(job.num, self.src.page_size)
                    self.counters.wire_bytes += send_buffers(self.sock, [data], f"multifd channel {self.cid} sync")
                    self.synced.release()
                elif isinstance(job, _Pages):
                    self._send_pages(job)
        except BaseException as exc:  # noqa: BLE001 - reported to the migration thread
            self.src.channel_failed(self.cid, exc)

    def _send_pages(self, job: _Pages) -> None:
        what = f"multifd channel {self.cid} packets"
        if self.src.limiter.rate:
            # capped: one packet at a time, so progress (and the cap) moves in packet steps
            for idx, num in job.packets:
                bufs = self._packet(job.block, idx, num)
                self.src.limiter.acquire(sum(len(b) for b in bufs))
                self.counters.wire_bytes += send_buffers(self.sock, bufs, what)
            return
        bufs = []
        for idx, num in job.packets:
            bufs += self._packet(job.block, idx, num)
        self.counters.wire_bytes += send_buffers(self.sock, bufs, what)

    def _packet(self, block: RamBlock, idx: np.ndarray, num: int) -> list[Buffer]:
        """Header and payload buffers of one packet; counts its pages."""
        ps = self.src.page_size
        first, n = int(idx[0]), int(idx.size)
        contiguous = int(idx[-1]) - first + 1 == n
        if self.src.zero_detect:
            p64 = self.src.pages64[block.name]
            view = p64[first : first + n] if contiguous else p64[idx]
            nonzero = nonzero_pages(view)
            normal = idx[nonzero]
            zero = idx[~nonzero]
        else:
            normal, zero = idx, idx[:0]
        mv = self.src.views[block.name]
        if normal.size == n and contiguous:
            page_runs = [mv[first * ps : (first + n) * ps]]
        else:
            page_runs = [mv[f * ps : (f + c) * ps] for f, c in runs(normal)]
        t0 = time.thread_time()
        payload = self.comp.compress(page_runs) if normal.size else []
        self.counters.codec_seconds += time.thread_time() - t0
        plen = sum(len(b) for b in payload)
        hdr = packet.encode_packet(
            flags=self.src.method.flag,
            packet_num=num,
            ramblock=block.name,
            normal=normal.astype(np.uint64) * ps,
            zero=zero.astype(np.uint64) * ps,
            next_packet_size=plen,
            page_size=ps,
        )
        c = self.counters
        c.packets += 1
        c.normal += int(normal.size)
        c.zero += int(zero.size)
        c.payload_bytes += plen
        return [hdr, *payload]


def _phases(t0: float, marks: list[tuple[str, float]]) -> dict[str, float]:
    """Milliseconds spent in each downtime phase, in order."""
    out: dict[str, float] = {}
    prev = t0
    for name, t in marks:
        out[name] = round((t - prev) * 1000, 2)
        prev = t
    return out


class Source:
    """Migrates ``guest`` to the destination listening at ``address``.

    ``run()`` blocks until the migration ends and returns the statistics; it does not raise for a
    failed or cancelled migration (the status and ``error`` say what happened). ``cancel()`` may be
    called from any thread.
    """

    def __init__(
        self,
        guest: Guest,
        address: Address,
        params: MigrationParameters,
        *,
        uuid: bytes = bytes(16),
        timeout: float = 30.0,
        full_verify: bool = False,
        dump_ram: str | None = None,
        wait_report: float = 0.0,
        on_progress: Callable[[MigrationStats], None] | None = None,
    ) -> None:
        params.check()
        self.guest = guest
        self.address = address
        self.params = params
        self.uuid = uuid
        self.timeout = timeout
        self.full_verify = full_verify
        self.dump_ram = dump_ram
        self.wait_report = wait_report
        self.on_progress = on_progress
        self.page_size = guest.page_size
        self.page_count = packet.page_count(self.page_size)
        self.method: Method = create_method(params.multifd_compression, params.level(), self.page_size)
        self.zero_detect = params.zero_page_detection == "multifd"
        self.limiter = RateLimiter(params.max_bandwidth)
        self.status = state.StatusMachine()
        self.stats = MigrationStats(
            page_size=self.page_size,
            method=self.method.name,
            level=params.level() if self.method.levels else 0,
            backend=self.method.backend(),
            accelerated=self.method.accelerated(),
            max_bandwidth=params.max_bandwidth,
            ram_total=guest.ram_size,
            guest=guest.describe(),
            expected_downtime_ms=params.downtime_limit,  # QEMU's initial value
        )
        self.status.listeners.append(self._on_status)
        _warm_numpy()
        self.views = {b.name: b.view() for b in guest.blocks}
        self.pages64 = {b.name: b.pages.view(np.uint64) for b in guest.blocks}
        self.digests = {b.name: ChunkDigest(self.views[b.name], self.page_size) for b in guest.blocks}
        self.channels: list[_SendChannel] = []
        self.main: socket.socket | None = None
        self.rp: LineChannel | None = None
        self.meter = ResourceMeter()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._packet_num = 0
        self._rr = 0
        self._paused_by_us = False
        self._running_bytes = True
        #: pages found dirty by the last sync before switchover, still to be sent
        self._pending: dict[str, np.ndarray] = {}

    # --- public ----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the migration to stop; the guest keeps (or resumes) running."""
        self._cancel.set()
        if self.status.try_step(state.CANCELLING):
            self._shutdown_sockets()

    def channel_failed(self, cid: int, exc: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                if isinstance(exc, MigrationError):
                    self._error = type(exc)(f"multifd channel {cid}: {exc}")
                else:
                    self._error = MigrationError(f"multifd channel {cid}: {type(exc).__name__}: {exc}")
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
            self._iterate()
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
        self.main = connect(self.address, self.timeout)
        self.rp = LineChannel(self.main)
        config = {
            "guest": json.loads(self.guest.config.to_json()),
            "page-size": self.page_size,
            "multifd-channels": self.params.multifd_channels,
            "multifd-compression": self.params.multifd_compression,
            "zero-page-detection": self.params.zero_page_detection,
            "blocks": [[b.name, b.size] for b in self.guest.blocks],
        }
        self._main_write(
            stream.file_header()
            + stream.configuration(MACHINE_TYPE)
            + stream.section_full(SECTION_CONFIG, "livemig/config", 0, 1)
            + stream.blob(json.dumps(config).encode())
            + stream.section_footer(SECTION_CONFIG),
            ram=False,
        )
        answer = self.rp.recv(self.timeout)
        if answer.get("status") != "ready":
            raise MigrationError(f"destination refused the migration: {answer.get('error', answer)}")
        for cid in range(self.params.multifd_channels):
            self._check()
            sock = connect(self.address, self.timeout)
            ch = _SendChannel(self, cid, sock, self.method.compressor(cid))
            self.channels.append(ch)
            ch.start()
        self.stats.channels = [c.counters for c in self.channels]
        self.guest.start_dirty_log()
        blocks = [(b.name, b.size) for b in self.guest.blocks]
        self._main_write(stream.section_start(SECTION_RAM, "ram", 0, 4) + stream.ram_mem_size(blocks))
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
            dirty = self._sync_dirty()
            now = time.monotonic()
            npages = sum(int(d.size) for d in dirty.values())
            self.stats.dirty_pages_rate = int(npages / max(1e-6, now - last_sync))
            last_sync = now
            self.stats.remaining = npages * self.page_size
            rate = moved / max(1e-6, now - active_start)
            self.stats.expected_downtime_ms = Convergence.expected_downtime_ms(npages, rate)
            self.meter.sample()
            if policy.should_switch(npages, rate, self.stats.passes):
                self._pending = dirty
                return

    def _complete(self) -> None:
        self.status.step(state.DEVICE)
        marks: list[tuple[str, float]] = []
        t_pause = time.monotonic()
        self.guest.pause()
        self._paused_by_us = True
        self._running_bytes = False
        self.limiter.set_rate(0)  # as QEMU: no bandwidth cap while the guest is stopped
        marks.append(("pause", time.monotonic()))
        final = self._sync_dirty()
        for name, idx in self._pending.items():
            final[name] = merge_pages(final.get(name, idx[:0]), idx)
        marks.append(("sync", time.monotonic()))
        self._main_write(stream.section_end(SECTION_RAM))
        npages = self._send_dirty(final)
        self._flush_round()
        self._main_write(stream.ram_eos() + stream.section_footer(SECTION_RAM))
        marks.append((f"send {npages} pages", time.monotonic()))
        blob = self.guest.save_state()
        marks.append(("save state", time.monotonic()))
        digests = {name: d.digest(self.full_verify) for name, d in self.digests.items()}
        marks.append(("digest", time.monotonic()))
        self._main_write(
            stream.section_full(SECTION_VCPU, "livemig/vcpu", 0, 1)
            + stream.blob(blob)
            + stream.section_footer(SECTION_VCPU)
            + stream.section_full(SECTION_DIGEST, "livemig/digest", 0, 1)
            + stream.blob(json.dumps({"algorithm": "xxh3-128-chunked", "blocks": digests}).encode())
            + stream.section_footer(SECTION_DIGEST)
            + stream.eof(),
            ram=False,
        )
        assert self.rp is not None
        answer = self.rp.recv(self.timeout)
        if answer.get("status") != "resumed":
            theirs = str(answer.get("error", answer)).removeprefix("destination: ")
            raise MigrationError(f"destination failed: {theirs}")
        now = time.monotonic()
        marks.append(("destination resumed", now))
        self.stats.downtime_ms = (now - t_pause) * 1000
        self.stats.downtime_phases = _phases(t_pause, marks)
        self.stats.total_time_ms = (now - self.stats.start) * 1000
        self.stats.remaining = 0
        self.stats.send_cpu_percent = self.meter.cpu_percent()
        self.stats.send_mem_bytes = self.meter.mem_bytes()
        self.stats.recv_cpu_percent = float(answer.get("recv-cpu-percent", 0.0))
        self.stats.recv_mem_bytes = int(answer.get("recv-mem-bytes", 0))
        self.stats.destination = {k: v for k, v in answer.items() if k not in ("recv-cpu-percent", "recv-mem-bytes")}
        self.status.step(state.COMPLETED)
        if self.dump_ram:
            self._dump(self.dump_ram)
        if self.wait_report:
            try:
                report = self.rp.recv(self.wait_report + self.timeout)
                self.stats.destination.update({k: v for k, v in report.items() if k != "status"})
            except TransportError as exc:
                self.stats.destination["report-error"] = str(exc)

    # --- pieces ----------------------------------------------------------------------------------
    def _send_dirty(self, dirty: dict[str, np.ndarray]) -> int:
        """Queue every dirty page, in packets of one block; returns the pages queued."""
        total = sum(int(d.size) for d in dirty.values())
        left = total
        for block in self.guest.blocks:
            idx = dirty.get(block.name)
            if idx is None or idx.size == 0:
                continue
            job = _Pages(block, [])
            for piece in chunks(idx, self.page_count):
                job.packets.append((piece, self._next_num()))
                left -= int(piece.size)
                if len(job.packets) == BATCH:
                    self._check()
                    self._dispatch(job)
                    job = _Pages(block, [])
                    self.stats.remaining = left * self.page_size
            if job.packets:
                self._check()
                self._dispatch(job)
            self.stats.remaining = left * self.page_size
        return total

    def _next_num(self) -> int:
        n = self._packet_num
        self._packet_num += 1
        return n

    def _dispatch(self, job: _Pages) -> None:
        """Round robin from the channel after the last one used, skipping busy channels."""
        n = len(self.channels)
        for k in range(n):
            ch = self.channels[(self._rr + k) % n]
            try:
                ch.q.put_nowait(job)
                self._rr = (self._rr + k + 1) % n
                return
            except queue.Full:
                continue
        ch = self.channels[self._rr]
        self._rr = (self._rr + 1) % n
        while True:
            self._check()
            try:
                ch.q.put(job, timeout=0.05)
                return
            except queue.Full:
                continue

    def _flush_round(self) -> None:
        """SYNC on every channel and wait until each has written it, then the main-stream marker."""
        for ch in self.channels:
            while True:
                self._check()
                try:
                    ch.q.put(_Sync(self._next_num()), timeout=0.05)
                    break
                except queue.Full:
                    continue
        for ch in self.channels:
            # wait while the channel makes progress (a slow cap or codec can take long); fail when it stalls
            seen, deadline = ch.counters.wire_bytes, time.monotonic() + self.timeout
            while not ch.synced.acquire(timeout=0.05):
                self._check()
                if ch.counters.wire_bytes != seen:
                    seen, deadline = ch.counters.wire_bytes, time.monotonic() + self.timeout
                elif time.monotonic() > deadline:
                    raise TransportError(
                        f"multifd channel {ch.cid} wrote nothing for {self.timeout:.0f} s before its SYNC"
                    )
        self._main_write(stream.ram_multifd_flush())

    def _sync_dirty(self) -> dict[str, np.ndarray]:
        dirty = self.guest.sync_dirty_log()
        self.stats.dirty_sync_count += 1
        for name, idx in dirty.items():
            self.digests[name].mark_pages(idx)
        return dirty

    def _main_write(self, data: bytes, ram: bool = True) -> None:
        assert self.main is not None
        self._check()
        n = send_buffers(self.main, [data], "main channel")
        self.stats.main_bytes += n
        if ram:
            if self._running_bytes:
                self.stats.precopy_bytes += n
            else:
                self.stats.downtime_bytes += n

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def _hash_loop(self) -> None:
        """Keep chunk digests fresh while the migration runs, a slice at a time."""
        while not self._done.is_set() and self.status.state in (state.ACTIVE, state.SETUP):
            did = sum(d.refresh(limit=16) for d in self.digests.values())
            time.sleep(0.002 if did else 0.05)

    def _on_status(self, new: str) -> None:
        self.stats.status = new
        if self.on_progress:
            self.on_progress(self.stats)

    def _fail(self, exc: BaseException) -> None:
        """End in cancelled (a cancel was asked) or failed, guest running again first."""
        if self._paused_by_us:  # failure during switchover: the guest runs on here, at once
            self._paused_by_us = False
            try:
                self.guest.resume()
            except MigrationError as resume_exc:
                self.stats.guest["resume-error"] = str(resume_exc)
        with self._error_lock:
            err = self._error or exc
        cancelled = self._cancel.is_set() or isinstance(err, Cancelled | KeyboardInterrupt)
        if cancelled:
            self.stats.error = "migration cancelled"
        else:
            self.stats.error = str(err) or type(err).__name__
            peer = self._peer_error().removeprefix("destination: ")
            if peer and peer not in self.stats.error:
                self.stats.error = f"{self.stats.error} (destination: {peer})"
        self.stats.total_time_ms = (time.monotonic() - self.stats.start) * 1000
        self.stats.send_cpu_percent = self.meter.cpu_percent()
        self.stats.send_mem_bytes = self.meter.mem_bytes()
        if cancelled:
            self.status.try_step(state.CANCELLING)
            self.status.try_step(state.CANCELLED)
        else:
            self.status.try_step(state.FAILED)
        self._shutdown_sockets()

    def _peer_error(self) -> str:
        """The destination's own account of a failure, if it sent one on the return path."""
        if self.rp is None or self._cancel.is_set():
            return ""
        try:
            msg = self.rp.recv(1.0)
        except MigrationError:
            return ""
        return str(msg.get("error", "")) if msg.get("status") in ("failed", "error") else ""

    def _shutdown_sockets(self, main: bool = True) -> None:
        socks = [c.sock for c in self.channels]
        if main and self.main is not None:
            socks.append(self.main)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _teardown(self) -> None:
        for ch in self.channels:
            try:
                ch.q.put_nowait(_STOP)
            except queue.Full:
                pass
        if self.status.state != state.COMPLETED:
            self._shutdown_sockets()
        for ch in self.channels:
            ch.join(timeout=5)
            ch.sock.close()
        if self.main is not None:
            self.main.close()
        try:
            self.guest.stop_dirty_log()
        except MigrationError:
            pass
        self.stats.status = self.status.state

    def _dump(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for b in self.guest.blocks:
            with open(os.path.join(directory, f"src-{b.name}.bin"), "wb") as f:
                f.write(self.views[b.name])

    def query(self) -> dict[str, Any]:
        """query-migrate, now."""
        return self.stats.to_qapi()
