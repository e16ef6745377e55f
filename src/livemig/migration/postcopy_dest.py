"""The destination side of post-copy (capability ``postcopy-ram``; docs/postcopy.md).

On the main stream, after the precopy passes (every page of which has landed: each pass ended with
its flush round)::

    POSTCOPY_ADVISE        (after livemig/config) check that userfaultfd works here
    POSTCOPY_RAM_DISCARD   drop the pages the source re-dirtied: they will come again
    POSTCOPY_LISTEN        stop reading guest RAM from Python (the digest loop), mark the dropped
                           pages missing (RamBlock.present), register every block with one
                           userfaultfd, start the fault thread; status postcopy-active
    livemig/vcpu, POSTCOPY_RUN   load the state, resume the guest at once, answer Resumed
    RAM records            each page placed with UFFDIO_COPY (ZERO: UFFDIO_ZEROPAGE), waking
                           the vCPUs that wait on it
    livemig/digest, EOF    every page present: unregister, compare the per-page hashes
                           (:mod:`.pagehash`), answer PostcopyDone (or Failed; the guest is paused)

The fault thread reads faults from the userfaultfd and asks the source for each missing page once
(:class:`~.protocol.ReqPages`). The thread that places pages (the main-stream reader) never reads or
writes guest RAM itself: a missing page would wait for the very thread that must place it
(docs/postcopy.md, "Guests and the GIL").
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import IntegrityError, MigrationError, TransportError, WireError
from ..guest import uffd
from ..transport.sockets import Listener
from ..wire import stream
from . import protocol, state
from .handover import ReturnPath
from .pagehash import ALGORITHM, PageHashes
from .postcopy_source import queue_bound
from .protocol import MACHINE_TYPE, RESUME_SECTION

if TYPE_CHECKING:
    from .destination import Destination

#: the post-copy commands, as the main stream's reader returns them
COMMANDS = (stream.PostcopyAdvise, stream.PostcopyDiscard, stream.PostcopyListen)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``; None when there are none."""
    return float(np.percentile(np.asarray(values), q)) if values else None


class PostcopyDestination:
    """The post-copy half of one :class:`~.destination.Destination`."""

    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        #: "" before post-copy, then postcopy-active / postcopy-paused / postcopy-recover / completed
        self.status = ""
        self.hashes: PageHashes | None = None
        self.listening = False
        self.ran = False
        self.uffd: uffd.Userfaultfd | None = None
        #: block name -> bool per page, True for a page dropped by POSTCOPY_RAM_DISCARD
        self._missing: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        #: (block, page) -> monotonic time of its first fault, until it is placed
        self._requested: dict[tuple[str, int], float] = {}
        self.latencies_us: list[float] = []
        self.faults = 0
        self.pages_requested = 0
        self.placed = 0
        self._stop = threading.Event()
        self._fault_thread: threading.Thread | None = None
        self._t_run = 0.0
        self._recovering = threading.Event()
        self._listener: Listener | None = None

    # --- the commands ------------------------------------------------------------------------------
    def command(self, ev: stream.PostcopyAdvise | stream.PostcopyDiscard | stream.PostcopyListen) -> None:
        if isinstance(ev, stream.PostcopyAdvise):
            self._advise(ev)
        elif self.hashes is None:
            raise WireError("post-copy command before POSTCOPY_ADVISE", type(ev).__name__, "POSTCOPY_ADVISE first")
        elif self.listening:
            raise WireError("post-copy command after POSTCOPY_LISTEN", type(ev).__name__, "POSTCOPY_RUN")
        elif isinstance(ev, stream.PostcopyDiscard):
            self._discard(ev)
        else:
            self._listen()

    def _advise(self, ev: stream.PostcopyAdvise) -> None:
        ps = self.dst.page_size
        if (ev.page_size_summary, ev.target_page_size) != (ps, ps):
            raise WireError("POSTCOPY_ADVISE page sizes (summary, target)",
                            (ev.page_size_summary, ev.target_page_size), (ps, ps),
                            note="Postcopy needs matching RAM page sizes")
        reason = uffd.unavailable()
        if reason is not None:
            raise MigrationError(f"post-copy is not possible on this destination: {reason}")
        self.hashes = PageHashes({n: b.npages for n, b in self.dst.blocks.items()}, ps)
        self._missing = {n: np.zeros(b.npages, dtype=bool) for n, b in self.dst.blocks.items()}

    def _discard(self, ev: stream.PostcopyDiscard) -> None:
        # nothing may read a dropped page before it is registered: unregistered, a touch would
        # allocate a zero page there that never faults (the guest would read zeros)
        self.dst.stop_hashing()
        block = self.dst.blocks.get(ev.block)
        if block is None:
            raise WireError("POSTCOPY_RAM_DISCARD RAM block", ev.block, f"one of {sorted(self.dst.blocks)}")
        ps = self.dst.page_size
        for start, length in ev.ranges:
            if start % ps or length % ps or start + length > block.size:
                raise WireError(f"POSTCOPY_RAM_DISCARD range of '{ev.block}' (start, length)", (start, length),
                                f"page-aligned, inside its {block.size} bytes")
            block.discard(start // ps, length // ps)
            self._missing[ev.block][start // ps:(start + length) // ps] = True
            self.dst.received[ev.block][start // ps:(start + length) // ps] = False

    def _listen(self) -> None:
        self.dst.stop_hashing()  # (no discard came) it reads guest RAM: never again until every page is back
        fd = self.uffd = uffd.Userfaultfd()
        for name, b in self.dst.blocks.items():
            b.present = ~self._missing[name]
            fd.register(b.address, b.size)
        self.listening = True
        queue_bound(self.dst.main)
        self._fault_thread = threading.Thread(target=self._serve_faults, name="postcopy-faults", daemon=True)
        self._fault_thread.start()
        self.status = state.POSTCOPY_ACTIVE

    def run(self, state_blob: bytes | None) -> None:
        """POSTCOPY_RUN: load the state and resume the guest now; it pulls its missing pages."""
        if not self.listening or state_blob is None:
            raise WireError("POSTCOPY_RUN before POSTCOPY_LISTEN and livemig/vcpu", "POSTCOPY_RUN",
                            "POSTCOPY_LISTEN, livemig/vcpu, POSTCOPY_RUN")
        guest = self.dst.guest
        assert guest is not None
        guest.load_state(state_blob)
        self._t_run = time.monotonic()
        self.dst.handover.read_progress = False  # this thread places pages: it must not read RAM
        self.dst.handover.postcopy_run()
        self.ran = True

    # --- faults ------------------------------------------------------------------------------------
    def _serve_faults(self) -> None:
        """The fault thread: each missing page faulted is requested from the source once."""
        assert self.uffd is not None
        ps = self.dst.page_size
        spans = [(b.address, b.address + b.size, b) for b in self.dst.blocks.values()]
        try:
            while not self._stop.is_set():
                for addr in self.uffd.read_faults(0.05):
                    self.faults += 1
                    block = next((b for lo, hi, b in spans if lo <= addr < hi), None)
                    if block is None or block.present is None:
                        continue
                    page = (addr - block.address) // ps
                    with self._lock:
                        if block.present[page] or (block.name, page) in self._requested:
                            continue
                        self._requested[(block.name, page)] = time.monotonic()
                    self.pages_requested += 1
                    rp = self.dst.handover.rp  # a new one after a recovery
                    try:
                        if rp is not None:
                            rp.send(protocol.ReqPages(block.name, page * ps, ps))
                    except MigrationError:
                        pass  # the link broke: sent again once it is recovered
        except BaseException as exc:  # noqa: BLE001 - the migration's failure
            self.dst.fail(exc, "post-copy fault thread")

    # --- pages -------------------------------------------------------------------------------------
    def landed(self, block: str, normal: np.ndarray, zero: np.ndarray) -> None:
        """A multifd packet's pages landed (precopy, a channel thread): hash them."""
        if self.hashes is not None:
            self.hashes.landed(block, self.dst.blocks[block].pages, normal, zero)

    def landed_main(self, ev: stream.Page | stream.ZeroPage) -> None:
        """A precopy page on the main channel landed."""
        if self.hashes is not None:
            self.hashes.put(ev.block, ev.offset // self.dst.page_size, ev.data if isinstance(ev, stream.Page) else None)

    def _place(self, ev: stream.Page | stream.ZeroPage) -> None:
        assert self.uffd is not None and self.hashes is not None
        block = self.dst.blocks.get(ev.block)
        if block is None or block.present is None:
            raise WireError("post-copy page of RAM block", ev.block, f"one of {sorted(self.dst.blocks)}")
        p = ev.offset // self.dst.page_size
        if block.present[p]:
            raise WireError(f"post-copy page {p} of '{ev.block}'", "already present", "a discarded page, sent once")
        addr = block.address + ev.offset
        if isinstance(ev, stream.Page):
            src = np.frombuffer(ev.data, dtype=np.uint8)
            placed = self.uffd.copy(addr, src.ctypes.data, src.size)
            self.hashes.put(ev.block, p, ev.data)
        else:
            placed = self.uffd.zeropage(addr, self.dst.page_size)
            self.hashes.put(ev.block, p, None)
        if not placed:  # something allocated it meanwhile: the guest may have read other bytes
            raise IntegrityError(f"post-copy page {p} of '{ev.block}' was present before it was placed")
        now = time.monotonic()
        with self._lock:
            block.present[p] = True
            t = self._requested.pop((ev.block, p), None)
        self.placed += 1
        if t is not None:
            self.latencies_us.append((now - t) * 1e6)

    def receive_rest(self, reader: stream.StreamReader) -> None:
        """The rest of the main stream after POSTCOPY_RUN: pages up to EOF, then completion. A broken
        main channel pauses (postcopy-paused) until :meth:`recover` brings a new one."""
        from .destination import Stalled  # the destination imports this module

        try:
            while True:
                try:
                    source_digests = self._read_to_eof(reader)
                    break
                except (TransportError, Stalled) as exc:
                    if self.dst._failure.error is not None:
                        raise
                    reader = self._paused(exc)
            self._complete(source_digests)
        except BaseException as exc:
            rp = self.dst.handover.rp
            try:  # best effort: the source then fails instead of waiting to recover a link that works
                if rp is not None:
                    rp.send(protocol.Failed(f"post-copy: {exc}"))
            except MigrationError:
                pass
            raise

    def _read_to_eof(self, reader: stream.StreamReader) -> Any:
        source_digests: Any = None
        while True:
            ev = self.dst.next_event(reader)
            if isinstance(ev, stream.Page | stream.ZeroPage):
                self._place(ev)
            elif isinstance(ev, stream.Blob) and ev.idstr == "livemig/digest":
                source_digests = json.loads(bytes(ev.data))
            elif isinstance(ev, stream.MemSize):  # a recovered channel opens the RAM section again
                mine = [(b.name, b.size) for b in self.dst.blocks.values()]
                if list(ev.blocks) != mine:
                    raise WireError("RAM block list after post-copy recovery", list(ev.blocks), mine)
            elif isinstance(ev, stream.Blob | stream.MultifdFlush | stream.ControlLine):
                raise WireError("main stream record in post-copy", type(ev).__name__, "RAM pages, livemig/digest, EOF")
            elif isinstance(ev, stream.Eof):
                return source_digests

    # --- recovery (docs/postcopy.md, "Failure and recovery") -------------------------------------
    def recover(self, listener: Listener) -> None:
        """``migrate-recover``: take the source's new main channel from ``listener``."""
        self._listener = listener
        self._recovering.set()

    def _paused(self, exc: BaseException) -> stream.StreamReader:
        """postcopy-paused until :meth:`recover`, then postcopy-recover: the reader of the new main
        channel, once the source resumed on it (a failed attempt pauses again)."""
        dst = self.dst
        self.status = state.POSTCOPY_PAUSED
        dst.log(f"post-copy paused, the link broke ({exc}): the guest waits for its pages")
        while True:
            while not self._recovering.wait(0.05):
                dst._check()  # a cancel ends the wait (the guest is lost)
                dst._restart_timer()
            self._recovering.clear()
            self.status = state.POSTCOPY_RECOVER
            try:
                return self._accept()
            except MigrationError as again:
                if dst._failure.error is not None:
                    raise
                self.status = state.POSTCOPY_PAUSED
                if dst.main is not None:
                    dst.main.close()  # the failed (or stranger's) channel: it gets nothing more
                dst.log(f"post-copy recovery failed ({again}): still paused")

    def _accept(self) -> stream.StreamReader:
        dst, ps = self.dst, self.dst.page_size
        assert self._listener is not None
        sock = None
        while sock is None:
            dst._check()
            dst._restart_timer()
            sock = self._listener.accept(0.1)
        sock.settimeout(dst.timeout)
        queue_bound(sock)
        if dst.main is not None:
            dst.main.close()
        dst.main = sock
        rp = dst.handover.rp = ReturnPath(sock, "to-destination", "source")
        reader = stream.StreamReader(page_size=ps)
        first = [dst.next_event(reader), dst.next_event(reader)]
        if not isinstance(first[1], stream.Configuration) or first[1].machine_type != MACHINE_TYPE:
            raise WireError("post-copy recovery channel's CONFIGURATION", first[1], MACHINE_TYPE)
        ev = dst.next_event(reader)
        if isinstance(ev, stream.SectionFull) and ev.idstr == RESUME_SECTION:
            ev = dst.next_event(reader)
        self._check_resumer(ev)
        while not isinstance(ev := dst.next_event(reader), stream.PostcopyResume):
            if not isinstance(ev, stream.RecvBitmap) or ev.block not in dst.blocks:
                raise WireError("post-copy recovery record", ev, "RECV_BITMAP of a RAM block, POSTCOPY_RESUME")
            present = dst.blocks[ev.block].present
            have = np.ones(dst.blocks[ev.block].npages, dtype=bool) if present is None else present
            rp.send(protocol.ReceivedBitmap(ev.block, np.packbits(have, bitorder="little").tobytes().hex()))
        rp.send(protocol.ResumeAck())
        with self._lock:
            outstanding = list(self._requested)
        for name, page in outstanding:  # asked for on the broken link: maybe never heard
            rp.send(protocol.ReqPages(name, page * ps, ps))
        self.status = state.POSTCOPY_ACTIVE
        return reader

    def _check_resumer(self, ev: stream.Event) -> None:
        """The recovery channel's first section names the migration (its uuid, as livemig/config
        did): a stranger that reaches the recovery listener is refused before it learns a bitmap."""
        if not isinstance(ev, stream.Blob) or ev.idstr != RESUME_SECTION:
            raise WireError("post-copy recovery channel's first section", ev, RESUME_SECTION)
        try:
            uuid = bytes.fromhex(json.loads(ev.data)["uuid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise WireError(f"{RESUME_SECTION} section", bytes(ev.data[:64]), '{"uuid": HEX}') from exc
        if uuid != self.dst.uuid:
            raise MigrationError(f"post-copy recovery channel from another migration (uuid {uuid.hex()}, "
                                 f"this one's {self.dst.uuid.hex()})")

    def _complete(self, source: Any) -> None:
        missing = {n: int((~b.present).sum()) for n, b in self.dst.blocks.items() if b.present is not None}
        if any(missing.values()):
            raise WireError("post-copy stream ended with pages missing", missing, "none")
        self.close()
        assert self.hashes is not None
        mine = self.hashes.digests()
        ok = (isinstance(source, dict) and source.get("algorithm") == ALGORITHM
              and source.get("blocks") == mine["blocks"])
        if not ok:
            guest = self.dst.guest
            if guest is not None:
                guest.pause()
            raise IntegrityError(f"post-copy verification failed: the per-page digests differ (source {source}, "
                                 f"destination {mine}); guest paused")
        self.status = state.COMPLETED
        rp = self.dst.handover.rp
        assert rp is not None
        rp.send(protocol.PostcopyDone(self.figures()))

    def figures(self) -> protocol.Stats:
        """The destination's post-copy figures (PostcopyDone's stats, in the result)."""
        p50, p99 = percentile(self.latencies_us, 50), percentile(self.latencies_us, 99)
        return {
            "faults": self.faults,
            "pages-requested": self.pages_requested,
            "pages-placed": self.placed,
            "fault-latency-us-p50": None if p50 is None else round(p50, 1),
            "fault-latency-us-p99": None if p99 is None else round(p99, 1),
            "postcopy-ms": round((time.monotonic() - self._t_run) * 1000) if self._t_run else 0,
            "verified": self.status == state.COMPLETED,
            "recv-cpu-percent": round(self.dst.meter.cpu_percent(), 1),
            "recv-mem-bytes": self.dst.meter.mem_bytes(),
        }

    def stop(self) -> None:
        """The migration ends (completed or failed): stop the fault thread. A guest that still
        misses pages stays registered: its vCPUs wait in their faults rather than run with holes."""
        self._stop.set()
        if self._fault_thread is not None and self._fault_thread is not threading.current_thread():
            self._fault_thread.join(timeout=5)

    def close(self) -> None:
        """Stop serving faults and unregister: pages still missing would read as zero from now on
        (only after every page arrived)."""
        self.stop()
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        for b in self.dst.blocks.values():
            b.present = None

