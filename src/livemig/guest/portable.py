"""The portable guest: runs anywhere, no KVM. vCPUs are host threads that mark what they write.

One RAM block, ``pc.ram``, of ``config.memory`` bytes (memfd). ``config.smp`` worker threads are
the vCPUs; they run the workload in short batches (a few hundred pages at most, numpy-vectorised,
then a sleep), checking a pause flag between batches, so :meth:`PortableGuest.pause` returns within
one batch and the engine's threads get the GIL most of the time.

Workloads (their state lives in RAM, see :mod:`livemig.guest.portable_workloads` for the layout):

``idle``
    The vCPU threads wait; RAM is never touched.
``dirty``
    ``dirty_rate`` page writes per second in all (0 = as fast as the threads can), each vCPU a
    share, at uniformly random pages of the working set (pages ``1 .. working_set``, 0 = all but
    page 0). Paced against the clock in batches every 2 ms. Rates count writes; the dirty log
    counts distinct pages, so at high rates over a small working set it reports fewer pages.
``counter``
    Each vCPU runs its own deterministic chain, ``dirty_rate`` steps per second in all, each step
    writing one page of the working set; :meth:`check_workload` checks the chain against a
    reference computed from the seed. The destination resumes from the step count in RAM.

On the source, RAM is filled as ``config.fill`` says, and the pages of the working set (and page 0)
are then allocated at once (MADV_POPULATE_WRITE), so the workload does not pay first-touch faults
while it is measured. The destination's RAM is zero and prefaulted; nothing runs until
:meth:`PortableGuest.resume`, which first checks the workload header that arrived in RAM.

The dirty log is a bitmap in KVM's layout (:mod:`livemig.guest.bitmap`), written by the workers
under a lock after the RAM writes it covers; :meth:`sync_dirty_log` swaps it for a clean one under
the same lock, so no write is lost between syncs. Figures (``python3 -m livemig.guest.portable_measure``,
2 cores): rates within 0.1 % from 1k to 100k pages/s; pause() median < 0.01 ms, max < 0.5 ms (it
waits for at most one batch). With
``dirty_rate`` 0 the threads run flat out and compete for the GIL with the migration's threads.
The CPU-side state (:meth:`save_state`) is a versioned JSON document with each
vCPU's random generator state; everything else is in RAM.

On a post-copy destination (``RamBlock.present`` set) each vCPU faults in the pages its next batch
writes, with the GIL released and outside the batch, before writing them; :meth:`progress` and
:meth:`resume` never wait for a missing page (docs/postcopy.md, "Guests and the GIL").
"""

from __future__ import annotations

import json
import mmap
import threading
import time
from typing import Any

import numpy as np

from ..errors import GuestError
from ..ram.pages import bitmap_to_pages
from ..wire.constants import PAGE_SIZE
from . import portable_workloads as wl
from .base import Guest, GuestConfig, RamBlock
from .bitmap import new_bitmap, set_page_bits
from .fill import fill_pages

BLOCK_NAME = "pc.ram"
WORKLOADS = ("idle", "dirty", "counter")
STATE_FORMAT = "livemig.portable-guest"
STATE_VERSION = 1

#: a paced worker runs a batch every BATCH_INTERVAL seconds
BATCH_INTERVAL = 0.002
#: the most pages one batch writes (bounds the pause latency)
MAX_BATCH = 1024
#: a worker that fell behind catches up at most this many seconds of its rate
MAX_DEBT = 0.05

_STAMP_MASK = 0x5A5A_A5A5_C3C3_3C3C
#: the workload's header page (page 0), written by every batch
_HEADER_PAGE = np.zeros(1, dtype=np.int64)


def create(config: GuestConfig, incoming: bool) -> PortableGuest:
    """Create a portable guest (see :func:`livemig.guest.create_guest` for what ``incoming`` means)."""
    return PortableGuest(config, incoming)


class PortableGuest(Guest):
    """A guest whose vCPUs are Python threads writing into a memfd RAM block."""

    kind = "portable"

    def __init__(self, config: GuestConfig, incoming: bool = False) -> None:
        super().__init__(config)
        _check_config(config)
        self.incoming = incoming
        ram = RamBlock(BLOCK_NAME, config.memory, self.page_size)
        self.blocks = [ram]
        self._ram = ram
        npages = self._npages = ram.npages
        self._ws_start = 1
        if config.workload != "idle" and self._ws_start + self._ws > npages:
            ram.close()
            raise GuestError(f"working_set {config.working_set} pages does not fit in {npages} pages of RAM "
                             f"(page 0 is the workload's header; at most {npages - 1})")
        self.fill_description = "zero (destination)"
        try:
            if incoming:
                ram.prefault()
            else:
                self.fill_description = fill_pages(ram.pages, config.fill, config.seed)
                if config.workload != "idle":
                    # the workload writes these pages at once: allocate them now, not while timed
                    _populate(ram, 0, self._ws_start + self._ws)
                    wl.init_header(ram.pages, config.workload, config.smp, self._ws_start, self._ws,
                                   config.seed)
        except BaseException:
            ram.close()
            raise

        self._rngs = [np.random.Generator(np.random.PCG64([config.seed, 0x76C9, i]))
                      for i in range(config.smp)]
        # dirty log
        self._log_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._npages = npages
        self._dirty = new_bitmap(npages)
        self._spare = new_bitmap(npages)
        self._logging = False
        # vCPU threads
        self._cond = threading.Condition()
        self._want_run = False
        self._stop = False
        self._active = 0
        self._epoch = 0  # bumped by every resume: workers restart their pacing clock
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []
        self._closed = False
        # post-copy (RamBlock.present set): the dirty pages a vCPU drew and faulted in, not written yet
        self._pending: list[np.ndarray | None] = [None] * config.smp
        #: resume() found page 0 missing: the first vCPU to fault it in checks the header
        self._header_pending = False
        #: the last value progress() read (returned while page 0 is missing)
        self._progress = 0

    @property
    def _ws(self) -> int:
        """Pages in the working set, from the current config (a destination's is replaced by the source's)."""
        return self.config.working_set or self._npages - 1

    @property
    def _rate(self) -> float:
        """Each vCPU's share of ``dirty_rate``, from the current config."""
        return float(self.config.dirty_rate) / self.config.smp

    # --- vCPUs -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPUs (no-op if they run)."""
        self.resume()

    def resume(self) -> None:
        """Run the vCPUs; on a guest with workload state, the header in RAM must be valid."""
        self._check_open()
        if self._want_run:
            return
        if self.config.workload != "idle":
            if self._ram.pages_present(_HEADER_PAGE):
                self._check_header()
            else:  # post-copy: never wait for a page here (the caller may be the thread placing it)
                self._header_pending = True
        with self._cond:
            self._want_run = True
            self._epoch += 1
            self._cond.notify_all()
        if not self._threads:
            for i in range(self.config.smp):
                t = threading.Thread(target=self._vcpu, args=(i,), name=f"vcpu-{i}", daemon=True)
                self._threads.append(t)
                t.start()

    def pause(self) -> None:
        """Stop every vCPU; returns once none is inside a batch (so RAM and log are complete)."""
        with self._cond:
            self._want_run = False
            self.throttle.interrupt()  # a vCPU sleeping for the throttle stops sleeping
            while self._active:
                self._cond.wait()

    @property
    def running(self) -> bool:
        return self._want_run and not self._closed

    # --- dirty log -------------------------------------------------------------------------------
    def start_dirty_log(self) -> None:
        with self._log_lock:
            self._dirty[:] = 0
            self._logging = True

    def sync_dirty_log(self) -> dict[str, np.ndarray]:
        with self._sync_lock:
            with self._log_lock:
                if not self._logging:
                    raise GuestError("sync_dirty_log: the dirty log is not started")
                log, self._dirty = self._dirty, self._spare
            pages = bitmap_to_pages(log, self._npages)
            log[:] = 0
            self._spare = log
        return {BLOCK_NAME: pages}

    def stop_dirty_log(self) -> None:
        with self._log_lock:
            self._logging = False

    def mark_dirty(self, block: str, pages: np.ndarray) -> None:
        ram = self.block(block)
        idx = np.asarray(pages, dtype=np.int64).reshape(-1)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= ram.npages):
            raise GuestError(f"mark_dirty: page index out of range 0..{ram.npages - 1} "
                             f"(got {int(idx.min())}..{int(idx.max())})")
        self._mark(idx)

    def _mark(self, idx: np.ndarray) -> None:
        with self._log_lock:
            if self._logging:
                set_page_bits(self._dirty, idx)

    # --- CPU-side state --------------------------------------------------------------------------
    def save_state(self) -> bytes:
        if self.running:
            raise GuestError("save_state: the guest is running (pause it first)")
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "workload": self.config.workload,
               "smp": self.config.smp, "memory": self.config.memory, "seed": self.config.seed,
               "vcpus": [{"rng": r.bit_generator.state} for r in self._rngs]}
        return json.dumps(doc, sort_keys=True).encode()

    def load_state(self, blob: bytes) -> None:
        if self.running:
            raise GuestError("load_state: the guest is running")
        try:
            doc = json.loads(bytes(blob).decode())
        except (ValueError, TypeError) as exc:
            raise GuestError(f"portable guest state is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise GuestError(f"portable guest state: expected a JSON object, got {type(doc).__name__}")
        expect: dict[str, Any] = {"format": STATE_FORMAT, "version": STATE_VERSION,
                                  "workload": self.config.workload, "smp": self.config.smp,
                                  "memory": self.config.memory, "seed": self.config.seed}
        for key, want in expect.items():
            if doc.get(key) != want:
                raise GuestError(f"portable guest state: field '{key}' is {doc.get(key)!r}, expected {want!r}")
        vcpus = doc.get("vcpus")
        if not isinstance(vcpus, list) or len(vcpus) != self.config.smp:
            raise GuestError(f"portable guest state: field 'vcpus' must be a list of {self.config.smp} entries")
        rngs = []
        for i, v in enumerate(vcpus):
            bitgen = np.random.PCG64()
            try:
                bitgen.state = v["rng"]
            except (KeyError, TypeError, ValueError) as exc:
                raise GuestError(f"portable guest state: vcpus[{i}].rng is not a PCG64 state: {exc!r}") from exc
            rngs.append(np.random.Generator(bitgen))
        self._rngs = rngs
        self._pending = [None] * self.config.smp

    # --- workload --------------------------------------------------------------------------------
    def progress(self) -> int:
        """Steps (counter) or page writes (dirty) done in all, read from RAM; 0 for idle.

        0 as well while page 0 holds no header at all (a destination before its RAM arrived). Never
        waits: while page 0 is missing (post-copy) it returns the last value it read (0 if none).
        """
        if self.config.workload == "idle" or self._closed:
            return 0
        if not self._ram.pages_present(_HEADER_PAGE):
            return self._progress
        if int(wl.words(self._ram.pages)[0, 0]) == 0:
            return 0
        self._progress = sum(wl.read_header(self._ram.pages).n)
        return self._progress

    def check_workload(self) -> None:
        """Check the workload's state in RAM against its reference; GuestError naming the first mismatch.

        A running guest is paused for the check and resumed after it: the check reads the header
        (steps done) and then the pages of the last steps, and a batch written in between would
        put values of steps the header does not count yet into those pages. In post-copy it waits
        for the missing pages it reads (never call it from the thread that places pages).
        """
        if self._errors:
            raise GuestError(f"vCPU failed: {self._errors[0]}")
        if self.config.workload == "idle":
            return
        was_running = self.running
        if was_running:
            self.pause()
        try:
            self._ram.ensure_pages(_HEADER_PAGE)
            self._check_header()
            if self.config.workload == "counter":
                wl.check_counter(self._ram.pages, self._ram.ensure_pages)
        finally:
            if was_running:
                self.resume()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"dirty_rate": self.config.dirty_rate, "working_set": self._ws,
                    "fill_description": self.fill_description})
        return out

    def close(self) -> None:
        if self._closed:
            return
        with self._cond:
            self._stop = True
            self._want_run = False
            self._cond.notify_all()
        self.throttle.close()
        for t in self._threads:
            t.join(timeout=5)
        self._closed = True
        for b in self.blocks:
            b.close()

    # --- internals -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise GuestError("the guest is closed")

    def _check_header(self) -> None:
        h = wl.read_header(self._ram.pages)
        got = (h.workload, h.smp, h.ws_start, h.ws, h.seed)
        want = (self.config.workload, self.config.smp, self._ws_start, self._ws, self.config.seed)
        if got != want:
            raise GuestError(f"workload header in RAM (workload, smp, ws_start, ws, seed) = {got}, "
                             f"expected {want} from the guest config")

    def _vcpu(self, cpu: int) -> None:
        """One vCPU thread: batches while running, parked while paused, gone when stopped."""
        workload = self.config.workload
        pages = self._ram.pages
        paced = self._rate > 0
        max_batch = MAX_BATCH if workload == "dirty" else min(MAX_BATCH, self._ws)
        a_tab, c_tab = wl.lcg_tables_cached(max_batch)
        t0 = 0.0
        done = 0
        epoch = -1
        while True:
            with self._cond:
                while not self._want_run and not self._stop:
                    self._cond.wait()
                if epoch != self._epoch:  # (re)started: pacing restarts now
                    epoch, t0, done = self._epoch, time.monotonic(), 0
                if self._stop:
                    return
                if workload == "idle":
                    while self._want_run and not self._stop:
                        self._cond.wait()
                    continue
                self._active += 1
            try:
                if paced:
                    due = int(self._rate * (time.monotonic() - t0)) - done
                    if due > self._rate * MAX_DEBT + max_batch:  # starved: forgive old debt
                        done += due - max_batch
                        due = max_batch
                    k = min(due, max_batch)
                else:
                    k = max_batch
                if k > 0 and self._ram.present is not None:
                    k = self._fault_in(cpu, k)
                if k > 0:
                    if workload == "dirty":
                        idx = self._dirty_batch(pages, cpu, k)
                    else:
                        idx = wl.counter_step(pages, cpu, k, a_tab, c_tab)
                    with self._log_lock:
                        if self._logging:
                            set_page_bits(self._dirty, idx)
                            set_page_bits(self._dirty, _HEADER_PAGE)
                    done += idx.size
            except Exception as exc:  # a vCPU that cannot run stops and says why
                self._errors.append(f"vCPU {cpu}: {exc!r}")
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()
                return
            with self._cond:
                self._active -= 1
                if not self._want_run:
                    self._cond.notify_all()
            t0 += self.throttle.hold(cpu, self._stopping)  # pacing counts vCPU time, not time held
            time.sleep(BATCH_INTERVAL if paced else 0)

    def _stopping(self) -> bool:
        """A throttle sleep ends: the guest is pausing or closing."""
        return not self._want_run or self._stop

    def _fault_in(self, cpu: int, k: int) -> int:
        """Post-copy: make the pages of vCPU ``cpu``'s next batch of ``k`` present; returns the batch
        size to write now (0: the guest was paused meanwhile, the batch waits for the next resume).

        Runs outside the batch (``_active`` not counting it), so pause() does not wait for a vCPU
        that waits for a page, as a KVM vCPU leaves a fault on a signal. The pages stay present
        (present only goes False -> True), so the batch that follows cannot fault with the GIL held.
        """
        ram = self._ram
        with self._cond:
            self._active -= 1
            self._cond.notify_all()
        try:
            ram.ensure_pages(_HEADER_PAGE)
            if self._header_pending:
                self._header_pending = False
                self._check_header()
            if self.config.workload == "dirty":
                idx = self._pending[cpu]
                if idx is None:
                    idx = self._pending[cpu] = self._dirty_pages(cpu, k)
                k = idx.size
            else:
                idx = wl.counter_pages(ram.pages, cpu, k)
            ram.ensure_pages(idx)
        finally:
            with self._cond:
                self._active += 1
                go_on = self._want_run and not self._stop
        return k if go_on else 0

    def _dirty_pages(self, cpu: int, k: int) -> np.ndarray:
        """The k pages of the working set vCPU ``cpu`` writes next (draws from its generator)."""
        out: np.ndarray = self._ws_start + self._rngs[cpu].integers(0, self._ws, k, dtype=np.int64)
        return out

    def _dirty_batch(self, pages: np.ndarray, cpu: int, k: int) -> np.ndarray:
        w = wl.words(pages)
        n = int(w[0, 8 + 4 * cpu])
        idx = self._pending[cpu]
        if idx is None:
            idx = self._dirty_pages(cpu, k)
        self._pending[cpu] = None
        k = idx.size
        stamps = (np.uint64(cpu) << np.uint64(48)) + np.arange(n + 1, n + k + 1, dtype=np.uint64)
        w[idx, 0] = stamps
        w[idx, 1 + (stamps % np.uint64(511)).astype(np.int64)] = stamps ^ np.uint64(_STAMP_MASK)
        w[0, 8 + 4 * cpu] = n + k
        return idx


def _populate(ram: RamBlock, first_page: int, npages: int) -> None:
    """Allocate pages [first_page, first_page + npages) now (MADV_POPULATE_WRITE, or touch them)."""
    start, length = first_page * ram.page_size, npages * ram.page_size
    try:
        ram.buf.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23), start, length)
    except OSError:
        sub = ram.pages[first_page:first_page + npages]
        sub[:, 0] = sub[:, 0]


def _check_config(config: GuestConfig) -> None:
    if config.workload not in WORKLOADS:
        raise GuestError(f"unknown workload '{config.workload}' (expected one of: {', '.join(WORKLOADS)})")
    if not isinstance(config.smp, int) or not 1 <= config.smp <= wl.MAX_VCPUS:
        raise GuestError(f"smp {config.smp!r} out of range 1..{wl.MAX_VCPUS} for the portable guest")
    if not isinstance(config.dirty_rate, int) or config.dirty_rate < 0:
        raise GuestError(f"dirty_rate {config.dirty_rate!r} must be an integer >= 0 (pages per second)")
    if not isinstance(config.working_set, int) or config.working_set < 0:
        raise GuestError(f"working_set {config.working_set!r} must be an integer >= 0 (pages)")
    if not isinstance(config.memory, int) or config.memory < 2 * PAGE_SIZE:
        raise GuestError(f"memory {config.memory!r} must be at least 2 pages (8192 bytes)")
    if not isinstance(config.seed, int):
        raise GuestError(f"seed {config.seed!r} must be an integer")
