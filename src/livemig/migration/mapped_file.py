"""Live migration into a mapped-ram file (``livemig migrate file:PATH --mapped-ram``; QEMU's format,
docs/mapped-ram.md).

The guest keeps running while its pages go to the file pass after pass, as over multifd: every
page has a fixed offset, so a page dirtied again is simply written again in place; then the guest
is paused, the last dirty pages, the bitmaps and (for a livemig snapshot) its CPU state and RAM
digests are written, and the guest stays paused (QEMU's ``postmigrate``). ``multifd-channels``
threads write pages in parallel with ``os.pwrite`` straight from guest RAM (no copy); zero pages
are never written, their bitmap bit stays clear, so the file is sparse. ``max-bandwidth`` caps the
bytes written while the guest runs, as on a socket.

Two kinds of file: a *livemig snapshot* (machine type ``livemig-1``, livemig's config, CPU state
and digest sections; ``livemig incoming file:PATH`` restores the guest, which carries on where it
stopped) and a *file for QEMU* (``machine_type`` given: the guest's RAM as QEMU's RAM block
``ramblock``, no livemig section, which QEMU would refuse; QEMU starts its CPU from reset).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import Cancelled, MigrationError, ParameterError, os_reason
from ..guest import Guest
from ..params import MigrationParameters
from ..ram.digest import ChunkDigest
from ..ram.pages import chunks, merge_pages, nonzero_pages, runs
from ..transport.ratelimit import RateLimiter
from ..wire import mapped_ram, packet, stream
from . import protocol, state
from .convergence import Convergence
from .protocol import MACHINE_TYPE, SECTION_CONFIG, SECTION_DIGEST, SECTION_RAM, SECTION_VCPU, livemig_config
from .stats import ChannelCounters, MigrationStats, ResourceMeter


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class PagePool:
    """``n`` threads (QEMU's multifd channels of a file migration) running page jobs in parallel.

    ``submit(job, *args)`` queues ``job(counters, *args)``, where ``counters`` is the running
    thread's :class:`ChannelCounters` (one per thread, in ``counters``); at most ``4 * n`` jobs wait,
    so queuing a whole pass holds no more than that many page lists. ``wait()`` returns once every
    job queued so far is done (QEMU's local sync of a file migration) and raises the first job's
    exception. ``check`` is called while queuing and raises to abandon the work.
    """

    def __init__(self, n: int, name: str, check: Callable[[], None]) -> None:
        self.counters = [ChannelCounters() for _ in range(n)]
        self._ids = itertools.count()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(n, thread_name_prefix=name, initializer=self._init)
        self._pending: list[Future[None]] = []
        self._limit = 4 * n
        self.check = check

    def _init(self) -> None:
        self._local.counters = self.counters[next(self._ids)]

    def _run(self, job: Callable[..., None], args: tuple[Any, ...]) -> None:
        job(self._local.counters, *args)

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        self.check()
        while len(self._pending) >= self._limit:
            self._pending.pop(0).result()
            self.check()
        self._pending.append(self._pool.submit(self._run, job, args))

    def wait(self) -> None:
        try:
            while self._pending:
                self._pending[0].result()
                self._pending.pop(0)
        finally:
            for f in self._pending:
                f.cancel()

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class FileSave:
    """Migrates ``guest`` (running) into the mapped-ram file ``path``; the same interface as
    :class:`~.source.Source`: ``run()`` returns the statistics and never raises for a failed or
    cancelled migration (``stats.status``, ``stats.error``); ``cancel()`` from any thread.

    ``machine_type`` None writes a livemig snapshot; a QEMU machine type (``pc-q35-10.0``) writes a
    file for QEMU with the guest's one RAM block named ``ramblock`` (ParameterError for a guest of
    several blocks). A failed or cancelled migration removes the file and resumes the guest.
    """

    def __init__(self, guest: Guest, path: str, params: MigrationParameters, *, machine_type: str | None = None,
                 ramblock: str = "pc.ram", dump_ram: str | None = None,
                 on_progress: Callable[[MigrationStats], None] | None = None) -> None:
        params.check()
        if params.multifd_compression != "none":
            raise ParameterError(f"--multifd-compression {params.multifd_compression}: a mapped-ram file holds "
                                 "raw pages (QEMU: mapped-ram is incompatible with compression); use none")
        if machine_type is not None and len(guest.blocks) != 1:
            raise ParameterError(f"a file for QEMU takes one RAM block; this guest has {len(guest.blocks)}")
        self.guest, self.path, self.params = guest, path, params
        self.machine_type = machine_type
        self.names = {b.name: ramblock if machine_type else b.name for b in guest.blocks}
        self.on_progress = on_progress
        self.dump_ram = dump_ram
        self.page_size = guest.page_size
        self.job_pages = packet.page_count(self.page_size)
        self._cancel = threading.Event()
        self.limiter = RateLimiter(params.max_bandwidth, sleep=self._cancel.wait)
        self.status = state.StatusMachine()
        self.stats = MigrationStats(page_size=self.page_size, method="none", level=None, backend="mapped-ram file",
                                    accelerated=False, max_bandwidth=params.max_bandwidth, ram_total=guest.ram_size,
                                    remaining=guest.ram_size, guest=guest.describe(),
                                    expected_downtime_ms=params.downtime_limit)
        self.status.listeners.append(self._on_status)
        self.meter = ResourceMeter()
        self.views = {b.name: b.view() for b in guest.blocks}
        zero_detect = params.zero_page_detection == "multifd"
        self.pages64 = {b.name: b.pages.view(np.uint64) for b in guest.blocks} if zero_detect else None
        self.bitmaps = {b.name: np.zeros(b.npages, dtype=bool) for b in guest.blocks}
        self.layouts: dict[str, mapped_ram.BlockLayout] = {}
        self.pool = PagePool(params.multifd_channels, "multifd-file", self._check)
        self.stats.channels = self.pool.counters
        self.fd = -1
        self._tail = 0  # where the main stream goes on after the RAM setup section
        self._paused = False

    def cancel(self) -> None:
        """Stop the migration: the guest runs on, the file is removed."""
        self._cancel.set()
        self.status.try_step(state.CANCELLING)

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("migration cancelled")

    def _on_status(self, new: str) -> None:
        self.stats.status = new
        if self.on_progress:
            self.on_progress(self.stats)

    def run(self) -> MigrationStats:
        self.meter.start()
        self.stats.start = time.monotonic()
        try:
            self.status.step(state.SETUP)
            self._setup()
            self.stats.setup_time_ms = (time.monotonic() - self.stats.start) * 1000
            self.status.step(state.ACTIVE)
            self.stats.begin_active()
            pending = self._iterate()
            self._complete(pending)
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a status
            self._fail(exc)
        finally:
            self.pool.close()
            if self.fd >= 0:
                os.close(self.fd)
            try:
                self.guest.stop_dirty_log()
            except MigrationError:
                pass
        return self.stats

    # --- phases ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MigrationError(f"cannot create {self.path}: {os_reason(exc)}") from exc
        head = stream.file_header() + mapped_ram.configuration(self.machine_type or MACHINE_TYPE)
        if self.machine_type is None:
            config = livemig_config(self.guest, self.params, bytes(16))
            head += (stream.section_full(SECTION_CONFIG, "livemig/config", 0, 1)
                     + stream.blob(json.dumps(config).encode()) + stream.section_footer(SECTION_CONFIG))
        blocks = [(self.names[b.name], b.size) for b in self.guest.blocks]
        pieces, layouts, end = mapped_ram.ram_setup(len(head), SECTION_RAM, blocks, self.page_size)
        self.layouts = {b.name: lay for b, lay in zip(self.guest.blocks, layouts, strict=True)}
        self._write(0, head)
        for at, data in pieces:
            self._write(at, data)
        tail = stream.ram_eos() + stream.section_footer(SECTION_RAM)
        self._write(end, tail)
        self._tail = end + len(tail)
        self.guest.start_dirty_log()

    def _iterate(self) -> dict[str, np.ndarray]:
        """Passes while the guest runs; returns what is dirty when the policy says switch over."""
        policy = Convergence(self.params.downtime_limit, self.params.max_passes)
        dirty = {b.name: np.arange(b.npages, dtype=np.int64) for b in self.guest.blocks}
        self.stats.dirty_sync_count = 1
        t0 = last = time.monotonic()
        moved = 0
        while True:
            self.stats.passes += 1
            moved += self._write_pages(dirty)
            dirty = self.guest.sync_dirty_log()
            self.stats.dirty_sync_count += 1
            now = time.monotonic()
            npages = sum(int(d.size) for d in dirty.values())
            self.stats.dirty_pages_rate = int(npages / max(1e-6, now - last))
            self.stats.remaining = npages * self.page_size
            last = now
            rate = moved / max(1e-6, now - t0)
            self.stats.expected_downtime_ms = Convergence.expected_downtime_ms(npages, rate)
            self.meter.sample()
            if policy.should_switch(npages, rate, self.stats.passes):
                return dirty

    def _complete(self, pending: dict[str, np.ndarray]) -> None:
        self.status.step(state.DEVICE)
        self.stats.end_active()
        t_pause = time.monotonic()
        self.guest.pause()
        self._paused = True
        self.limiter.set_rate(0)  # as QEMU: no cap while the guest is stopped
        final = self.guest.sync_dirty_log()
        for name, idx in pending.items():
            final[name] = merge_pages(final.get(name, idx[:0]), idx)
        self._write_pages(final)
        for name, lay in self.layouts.items():
            words = np.packbits(self.bitmaps[name], bitorder="little")
            self._write(lay.bitmap_offset, words.tobytes().ljust(lay.bitmap_size, b"\0"))
        tail = stream.section_end(SECTION_RAM) + stream.ram_eos() + stream.section_footer(SECTION_RAM)
        if self.machine_type is None:
            blob = self.guest.save_state()
            digests = {b.name: ChunkDigest(self.views[b.name], self.page_size).digest(full=True)
                       for b in self.guest.blocks}
            tail += (stream.section_full(SECTION_VCPU, "livemig/vcpu", 0, 1) + stream.blob(blob)
                     + stream.section_footer(SECTION_VCPU)
                     + stream.section_full(SECTION_DIGEST, "livemig/digest", 0, 1)
                     + stream.blob(json.dumps({"algorithm": protocol.DIGEST_ALGORITHM, "blocks": digests}).encode())
                     + stream.section_footer(SECTION_DIGEST))
        self.stats.guest["progress-at-pause"] = self.guest.progress()
        if self.dump_ram:  # RAM as saved, for tests (src-<block>.bin, as the source of a socket migration)
            os.makedirs(self.dump_ram, exist_ok=True)
            for b in self.guest.blocks:
                with open(os.path.join(self.dump_ram, f"src-{b.name}.bin"), "wb") as f:
                    f.write(self.views[b.name])
        tail += stream.eof() + stream.vm_description(json.dumps({"page_size": self.page_size, "devices": []}))
        self._write(self._tail, tail)
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise MigrationError(f"{self.path}: cannot flush to the disk: {os_reason(exc)}") from exc
        now = time.monotonic()
        self.stats.downtime_ms = (now - t_pause) * 1000
        self.stats.total_time_ms = (now - self.stats.start) * 1000
        self.stats.remaining = 0
        self.stats.send_cpu_percent = self.meter.cpu_percent()
        self.stats.send_mem_bytes = self.meter.mem_bytes()
        self.stats.handover = protocol.S_COMPLETED
        self.stats.source_guest = "postmigrate"  # as QEMU after a migration to a file
        self.status.step(state.COMPLETED)

    # --- pieces ----------------------------------------------------------------------------------
    def _write(self, offset: int, data: bytes) -> None:
        """Main-stream bytes at ``offset`` (counted as the main channel's)."""
        self._check()
        try:
            pwrite_all(self.fd, memoryview(data), offset)
        except OSError as exc:
            raise MigrationError(f"cannot write {self.path}: {os_reason(exc)}") from exc
        self.stats.main_bytes += len(data)

    def _write_pages(self, dirty: dict[str, np.ndarray]) -> int:
        """Every page of ``dirty`` to its place (zero pages: bit cleared, nothing written), in jobs of
        a multifd packet's pages on the pool's threads; returns once all are written."""
        total = sum(int(d.size) for d in dirty.values())
        left = total
        try:
            for name, idx in dirty.items():
                for piece in chunks(idx, self.job_pages):
                    self.pool.submit(self._job, name, piece)
                    left -= int(piece.size)
                    self.stats.remaining = left * self.page_size
            self.pool.wait()
        except OSError as exc:
            raise MigrationError(f"cannot write {self.path}: {os_reason(exc)}") from exc
        return total

    def _job(self, counters: ChannelCounters, name: str, idx: np.ndarray) -> None:
        ps = self.page_size
        if self.pages64 is not None:
            first, n = int(idx[0]), int(idx.size)
            p64 = self.pages64[name]
            nonzero = nonzero_pages(p64[first : first + n] if int(idx[-1]) - first + 1 == n else p64[idx])
            normal, zero = idx[nonzero], idx[~nonzero]
        else:
            normal, zero = idx, idx[:0]
        bitmap = self.bitmaps[name]
        bitmap[zero] = False
        lay, view = self.layouts[name], self.views[name]
        for first, count in runs(normal):
            if self._cancel.is_set():
                return
            self.limiter.acquire(count * ps)
            pwrite_all(self.fd, view[first * ps : (first + count) * ps], lay.pages_offset + first * ps)
            counters.wire_bytes += count * ps
        bitmap[normal] = True
        counters.normal += int(normal.size)
        counters.zero += int(zero.size)
        counters.payload_bytes += int(normal.size) * ps
        counters.packets += 1

    def _fail(self, exc: BaseException) -> None:
        cancelled = self._cancel.is_set() or isinstance(exc, KeyboardInterrupt)
        self.stats.end_active()
        self.stats.error = "migration cancelled" if cancelled else (str(exc) or type(exc).__name__)
        if self._paused:
            try:
                self.guest.resume()
            except MigrationError as resume_exc:
                self.stats.guest["resume-error"] = str(resume_exc)
        try:
            os.unlink(self.path)  # half a snapshot must not be restored
        except OSError:
            pass
        self.stats.total_time_ms = (time.monotonic() - self.stats.start) * 1000
        self.stats.handover = protocol.S_CANCELLED if cancelled else protocol.S_FAILED
        self.stats.source_guest = "running"
        if cancelled:
            self.status.try_step(state.CANCELLING)
            self.status.try_step(state.CANCELLED)
        else:
            self.status.try_step(state.FAILED)

    def query(self) -> dict[str, Any]:
        """query-migrate, now."""
        return self.stats.to_qapi()
