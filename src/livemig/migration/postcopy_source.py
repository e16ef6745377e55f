"""The source side of post-copy (capability ``postcopy-ram``; docs/postcopy.md).

:class:`~.source.Source` runs precopy passes as usual; when the switch is due (``start_postcopy()``
or pass ``postcopy_after_passes``) and precopy did not converge first, :meth:`PostcopySource.run`
takes over from the pause::

    main:   [every precopy pass ended with its flush round: each page sent so far has landed]
            POSTCOPY_RAM_DISCARD per block (the pages dirtied since they were sent)
            POSTCOPY_LISTEN, FULL livemig/vcpu (the guest state), POSTCOPY_RUN   == commit point
            PART ram: the discarded pages, requested ones first, each once; EOS
            END ram: EOS; FULL livemig/digest (post-copy form); EOF
    return: Resumed (downtime ends), ReqPages ..., PostcopyDone

After POSTCOPY_RUN the source's guest never resumes (QEMU's ``postmigrate``): the destination runs
it, and only the two sides together hold its RAM. A failure before RUN was written resumes it, as
in precopy.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MigrationError, TransportError
from ..ram.pages import nonzero_pages, runs
from ..transport.sockets import Connector
from ..wire import stream
from . import protocol, state
from .handover import HandoverTimeout, PeerFailed, ReturnPath
from .pagehash import Background
from .protocol import MACHINE_TYPE, RESUME_SECTION, SECTION_CONFIG, SECTION_DIGEST, SECTION_RAM, SECTION_VCPU
from .stats import downtime_phases

if TYPE_CHECKING:
    from .source import Source

#: background pages written per main-channel write (requests are looked at between writes)
BATCH = 16
#: bytes a post-copy main channel's kernel buffers hold, each side (the kernel doubles it)
QUEUE_BYTES = 128 << 10


def queue_bound(sock: socket.socket | None) -> None:
    """Keep the socket's kernel buffer to :data:`QUEUE_BYTES`: a requested page is written behind
    what the buffers already hold, so the less they hold the sooner it lands."""
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, QUEUE_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, QUEUE_BYTES)
        except OSError:
            pass  # not a kernel socket (TLS wraps one): keep its buffers


class PostcopySource:
    """The post-copy half of one :class:`~.source.Source`. ``after_passes``: switch after that many
    precopy passes (None: only when :meth:`request` is called, QMP ``migrate-start-postcopy``)."""

    def __init__(self, src: Source, after_passes: int | None) -> None:
        self.src = src
        self.after_passes = after_passes
        self._requested = threading.Event()
        #: the switch to post-copy was decided (``run`` follows the precopy loop)
        self.switching = False
        #: POSTCOPY_RUN went out: the guest is the destination's from here on
        self.ran = False
        self._requests: queue.SimpleQueue[protocol.ReqPages] = queue.SimpleQueue()
        self._done = threading.Event()
        self._finished = False
        self._answer: protocol.PostcopyDone | None = None
        self._resumed: protocol.Resumed | None = None
        self._resumed_at = 0.0
        self._todo: dict[str, np.ndarray] = {}
        self._blocks = {b.name: b for b in src.guest.blocks}
        self._hasher: Background | None = None
        self._reader: threading.Thread | None = None
        self._link_down = threading.Event()
        self._link_error = ""
        self._resume = threading.Event()
        self._resume_to: Connector | None = None
        self._abandon = threading.Event()

    def request(self) -> None:
        """``migrate-start-postcopy``: switch at the end of the current pass."""
        self._requested.set()

    def should_switch(self, passes: int) -> bool:
        """After pass ``passes``: is the switch due? (Precopy's own convergence is checked first.)"""
        due = self._requested.is_set() or (self.after_passes is not None and passes >= self.after_passes)
        self.switching = due
        return due

    # --- the switch --------------------------------------------------------------------------------
    def run(self) -> None:
        """From the pause to ``completed``; raises (the Source fails) on any error."""
        src, stats = self.src, self.src.stats
        # the guest still runs: drop on the destination what the last pass found dirty (it is sent
        # again in post-copy whatever happens), so that only pages dirtied since remain for the pause
        early = {b.name: np.zeros(b.npages, dtype=bool) for b in src.guest.blocks}
        for name, idx in src._pending.items():
            early[name][idx] = True
        src.ping_destination(self._discards(early))
        # and what it dirtied meanwhile: the final sync (in the downtime) then has little to collect
        extra = {name: np.zeros_like(m) for name, m in early.items()}
        for name, idx in src._sync_dirty().items():
            extra[name][idx] = True
            extra[name] &= ~early[name]
            early[name] |= extra[name]
        src.ping_destination(self._discards(extra))
        src._pending = {name: np.flatnonzero(m) for name, m in early.items()}
        t_pause, marks, final = src._pause()
        for b in src.guest.blocks:
            todo = np.zeros(b.npages, dtype=bool)
            todo[final.get(b.name, np.empty(0, dtype=np.int64))] = True
            self._todo[b.name] = todo
            early[b.name] = todo & ~early[b.name]  # dirtied since the early discard
        discards = [self._discards(early)]
        blob = src.guest.save_state()
        marks.append(("save state", time.monotonic()))
        src._main_write(b"".join(discards) + stream.postcopy_listen()
                       + stream.section_full(SECTION_VCPU, "livemig/vcpu", 0, 1) + stream.blob(blob)
                       + stream.section_footer(SECTION_VCPU) + stream.postcopy_run(), ram=False)
        src.handover.postcopy_run()
        self.ran = True
        marks.append(("run", time.monotonic()))
        t_run = time.monotonic()
        npages = sum(int(t.sum()) for t in self._todo.values())
        stats.remaining = npages * src.page_size
        src.status.step(state.POSTCOPY_ACTIVE)
        src.limiter.set_rate(src.params.max_postcopy_bandwidth or src.params.max_bandwidth)
        queue_bound(src.main)
        recovered = False
        while True:
            try:
                self._stream(recovered)
                break
            except BaseException as exc:  # noqa: BLE001 - a broken link pauses, anything else fails
                if not self._link_lost(exc):
                    raise
                self._recover(exc)
                recovered = True
        self._finished = True
        src._check()
        assert self._answer is not None and self._resumed is not None
        end = time.monotonic()
        stats.downtime_ms = (self._resumed_at - t_pause) * 1000
        marks.append(("destination resumed", self._resumed_at))
        stats.downtime_phases = downtime_phases(t_pause, marks)
        done = dict(self._answer.stats)
        stats.postcopy = {
            "time-ms": round((end - t_run) * 1000),
            "pages-requested": int(done.get("pages-requested") or 0),
            "faults": int(done.get("faults") or 0),
            "fault-latency-us": {"p50": done.get("fault-latency-us-p50"), "p99": done.get("fault-latency-us-p99")},
            "verified": done.get("verified"),
        }
        answer: dict[str, Any] = dict(self._resumed.stats)
        stats.recv_cpu_percent = float(done.pop("recv-cpu-percent", None) or 0.0)
        stats.recv_mem_bytes = int(done.pop("recv-mem-bytes", None) or 0)
        answer.update(done)
        stats.destination = answer
        stats.total_time_ms = (end - stats.start) * 1000
        stats.remaining = 0
        stats.send_cpu_percent = src.meter.cpu_percent()
        stats.send_mem_bytes = src.meter.mem_bytes()
        src.status.step(state.COMPLETED)

    def _stream(self, recovered: bool) -> None:
        """Every page still to send, the RAM section's end, the digests and EOF on the main channel,
        then the destination's PostcopyDone. ``recovered``: a new main channel, whose reader has
        not seen the RAM section yet (it is opened again, with its MEM_SIZE)."""
        src = self.src
        self._link_down.clear()
        self._reader = threading.Thread(target=self._read_return_path, name="postcopy-rp", daemon=True)
        self._reader.start()
        npages = sum(int(t.sum()) for t in self._todo.values())
        src.stats.remaining = npages * src.page_size
        head = (stream.section_start(SECTION_RAM, "ram", 0, 4) + stream.ram_mem_size(src._ram_blocks())
                if recovered else stream.section_part(SECTION_RAM))
        self._send_pages(npages, head)
        src._main_write(stream.section_end(SECTION_RAM) + stream.ram_eos() + stream.section_footer(SECTION_RAM)
                        + stream.section_full(SECTION_DIGEST, "livemig/digest", 0, 1)
                        + stream.blob(json.dumps(self._hashes().result().digests()).encode())
                        + stream.section_footer(SECTION_DIGEST) + stream.eof(), ram=False)
        deadline = time.monotonic() + src.timeout
        while not self._done.wait(0.05):
            src._check()
            self._check_link()
            if time.monotonic() > deadline:
                raise HandoverTimeout(f"no post-copy completion from the destination within {src.timeout:g} s")

    def _check_link(self) -> None:
        if self._link_down.is_set():
            raise TransportError(f"post-copy return path: {self._link_error}")

    def _link_lost(self, exc: BaseException) -> bool:
        """``exc`` is the main channel breaking (recoverable), not a local failure or a cancel."""
        root: BaseException | None = exc
        while root is not None and not isinstance(root, TransportError):
            root = root.__cause__
        return root is not None and self.src._failure.error is None and not self._abandon.is_set()

    # --- recovery (docs/postcopy.md, "Failure and recovery") -------------------------------------
    def resume(self, connector: Connector) -> None:
        """``migrate URI resume=true``: reconnect through ``connector`` (status postcopy-paused)."""
        self._resume_to = connector
        self._resume.set()

    def abandon(self) -> None:
        """A cancel: a paused post-copy gives up (the guest is lost); an active one is not stopped."""
        if self.src.status.state in (state.POSTCOPY_PAUSED, state.POSTCOPY_RECOVER):
            self._abandon.set()
            self._resume.set()

    def _recover(self, exc: BaseException) -> None:
        """postcopy-paused until :meth:`resume`, then postcopy-recover on the new main channel:
        RECV_BITMAP per block (the destination's present pages: the others are queued again),
        POSTCOPY_RESUME, its ack; back to postcopy-active. A failed attempt pauses again."""
        src = self.src
        src.status.step(state.POSTCOPY_PAUSED)
        src.log(f"post-copy paused, the link broke ({exc}): the guest waits for the link")
        if self._reader is not None:
            self._reader.join(timeout=5)
        while True:
            if src.main is not None:
                try:
                    src.main.shutdown(socket.SHUT_RDWR)  # closed when a new one replaces it
                except OSError:
                    pass
            self._resume.wait()
            self._resume.clear()
            if self._abandon.is_set():
                raise MigrationError(f"post-copy paused and cancelled: {exc}") from exc
            src.status.step(state.POSTCOPY_RECOVER)
            try:
                self._reconnect()
                break
            except MigrationError as again:
                src.status.step(state.POSTCOPY_PAUSED)
                src.log(f"post-copy recovery failed ({again}): still paused")
        src.status.step(state.POSTCOPY_ACTIVE)

    def _reconnect(self) -> None:
        src = self.src
        assert self._resume_to is not None
        old, src.main = src.main, self._resume_to.connect(src.timeout)
        queue_bound(src.main)
        if old is not None:
            old.close()
        rp = src.rp = src.handover.rp = ReturnPath(src.main, "to-source", "destination")
        src._main_write(stream.file_header() + stream.configuration(MACHINE_TYPE)
                        + stream.section_full(SECTION_CONFIG, RESUME_SECTION, 0, 1)
                        + stream.blob(json.dumps({"uuid": src.uuid.hex()}).encode())
                        + stream.section_footer(SECTION_CONFIG)
                        + b"".join(stream.recv_bitmap(b.name) for b in src.guest.blocks), ram=False)
        for b in src.guest.blocks:
            msg = rp.recv(src.timeout)
            if not isinstance(msg, protocol.ReceivedBitmap) or msg.rbname != b.name:
                raise MigrationError(f"destination answered {msg} to RECV_BITMAP {b.name!r}")
            bits = np.unpackbits(np.frombuffer(bytes.fromhex(msg.bitmap), dtype=np.uint8), bitorder="little")
            if bits.size < b.npages:
                raise MigrationError(f"destination's bitmap of {b.name!r} has {bits.size} bits, {b.npages} pages")
            self._todo[b.name] = ~bits[:b.npages].astype(bool)  # pages in flight when it broke come again
        src._main_write(stream.postcopy_resume(), ram=False)
        msg = rp.recv(src.timeout)
        if not isinstance(msg, protocol.ResumeAck):
            raise MigrationError(f"destination answered {msg} to POSTCOPY_RESUME, expected resume-ack")

    def _discards(self, pages: dict[str, np.ndarray]) -> bytes:
        """POSTCOPY_RAM_DISCARD records for ``pages`` (block name -> bool per page)."""
        ps = self.src.page_size
        return b"".join(stream.postcopy_ram_discard(name, [(f * ps, n * ps) for f, n in runs(np.flatnonzero(m))])
                        for name, m in pages.items())

    # --- pages -------------------------------------------------------------------------------------
    def _send_pages(self, npages: int, head: bytes) -> None:
        """Every discarded page once, on the main channel after ``head``: requested pages first,
        then ascending."""
        src = self.src
        left = npages
        src._main_write(head, ram=False)
        for b in src.guest.blocks:
            todo = self._todo[b.name]
            for first in range(0, b.npages, 4096):
                idx = np.flatnonzero(todo[first:first + 4096]) + first
                for i in range(0, idx.size, BATCH):
                    self._check_link()
                    left -= self._serve_requests()
                    if self._resumed is not None:
                        self._hashes()
                    batch = idx[i:i + BATCH]
                    batch = batch[todo[batch]]  # a request may have sent some already
                    if batch.size:
                        left -= self._write(b.name, batch)
                    src.stats.remaining = left * src.page_size
        src._main_write(stream.ram_eos() + stream.section_footer(SECTION_RAM), ram=False)

    def _hashes(self) -> Background:
        """The per-page hashes of the frozen RAM (:mod:`.pagehash`), computed in a thread started
        once the destination resumed (before, it would compete with the switch for the CPU)."""
        if self._hasher is None:
            self._hasher = Background(self.src.guest)
        return self._hasher

    def _serve_requests(self) -> int:
        """Write the pages of every queued request not yet sent; returns how many."""
        n = 0
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return n
            todo = self._todo.get(req.rbname)
            if todo is None:
                raise MigrationError(f"destination requested pages of an unknown RAM block {req.rbname!r}")
            ps = self.src.page_size
            first, last = req.start // ps, (req.start + max(1, req.len) - 1) // ps
            if last >= todo.size:
                raise MigrationError(f"destination requested bytes {req.start}+{req.len} outside RAM block "
                                     f"{req.rbname!r}")
            idx = np.arange(first, last + 1)
            idx = idx[todo[idx]]  # a page sent already is never sent twice
            if idx.size:
                n += self._write(req.rbname, idx)

    def _write(self, block: str, idx: np.ndarray) -> int:
        """RAM records for pages ``idx`` of ``block`` (ZERO for zero pages), in one write."""
        src = self.src
        pages = self._blocks[block].pages
        nonzero = nonzero_pages(pages[idx].view(np.uint64))
        ps = src.page_size
        out = b"".join(stream.ram_page(block, int(p) * ps, pages[p]) if nz else stream.ram_zero_page(block, int(p) * ps)
                       for p, nz in zip(idx, nonzero, strict=True))
        self._todo[block][idx] = False
        src._main_write(out, ram=False)
        src.stats.postcopy_bytes += len(out)
        return int(idx.size)

    # --- return path -------------------------------------------------------------------------------
    def _read_return_path(self) -> None:
        """Requests, Resumed and the final PostcopyDone (or Failed), until the migration ends."""
        src = self.src
        assert src.rp is not None
        try:
            while not self._finished:
                msg = src.rp.poll(0.05)  # the sender writes the same socket: its timeout stays as it is
                if msg is None:
                    continue
                if isinstance(msg, protocol.ReqPages):
                    src.stats.postcopy_requests += 1
                    self._requests.put(msg)
                elif isinstance(msg, protocol.Resumed):
                    self._resumed, self._resumed_at = msg, time.monotonic()
                    src.handover.h.step("resumed")
                elif isinstance(msg, protocol.PostcopyDone):
                    self._answer = msg
                    if self._resumed is None:
                        raise MigrationError("destination completed post-copy without saying it resumed")
                    self._done.set()
                    return
                elif isinstance(msg, protocol.Failed | protocol.Refused):
                    raise PeerFailed(f"destination failed: {msg.error.removeprefix('destination: ')}")
                else:
                    raise MigrationError(f"destination sent '{msg.TYPE}' during post-copy")
        except BaseException as exc:  # noqa: BLE001 - the migration's failure, seen by the sender
            if self._finished:
                return
            if isinstance(exc, TransportError):  # the link broke: the sender pauses (recoverable)
                self._link_error = str(exc)
                self._link_down.set()
                if src.main is not None:
                    try:
                        src.main.shutdown(socket.SHUT_RDWR)  # the sender's write fails at once
                    except OSError:
                        pass
            elif src._failure.record(exc, "post-copy return path"):
                src._stop.set()
                src._shutdown_sockets()  # the sender's next write fails at once
                self._done.set()

