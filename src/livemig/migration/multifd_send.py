"""The source's multifd channels (docs/wire.md, "Multifd packet"; threads: docs/datapath.md).

:class:`SendChannels` numbers packets and hands page jobs round robin to the :class:`SendChannel`
objects; at most one :class:`SendWorker` thread per core runs them (a channel always on the same
thread), detecting zero pages, compressing and writing packets in order; a flush puts a SYNC packet
on every channel and waits until each has written it. Every byte a channel writes (handshake,
headers, payloads, SYNC) is charged to the bandwidth limiter first; under a cap a channel writes in
pieces of ``PIECE_SECONDS`` of the rate, so a 512 KiB packet at 16 KiB/s shows progress every few
KiB instead of once after 32 s. The receive side: :mod:`.multifd`.
"""
from __future__ import annotations

import fcntl
import os
import queue
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from ..compress import Buffer, Method
from ..errors import TransportError
from ..ram.digest import ChunkDigest
from ..ram.pages import chunks, nonzero_pages, runs
from ..transport.ratelimit import RateLimiter
from ..transport.sockets import kernel_timeouts, send_buffers
from ..wire import handshake, packet
from .stats import ChannelCounters

#: packets per channel job: fewer queue hand-offs and syscalls, same packets on the wire
BATCH = 4
#: send threads at most (one per core): the channels are shared among them (:class:`SendWorker`)
SEND_THREADS = max(1, len(os.sched_getaffinity(0)))
#: jobs a send thread may have queued per channel it serves
QUEUE_JOBS = 4

#: progress unit on both sides: a channel (or the main stream) has made progress once this many bytes
#: moved since the last progress; fewer (a peer dribbling a byte now and then) never resets a timer
PROGRESS_BYTES = 4096
#: a capped channel writes in pieces of this many seconds of the rate (at least PROGRESS_BYTES), so
#: its byte counter moves while a large packet crawls through the cap
PIECE_SECONDS = 0.1


@dataclass
class _Pages:
    """Up to BATCH consecutive packets of one block, sent with one vectored write (uncapped)."""

    block: str
    #: (page indices of the packet, int64; packet number)
    packets: list[tuple[np.ndarray, int]] = field(default_factory=list)


@dataclass
class _Sync:
    num: int


_STOP = object()
#: a channel's first job: its handshake
_HELLO = object()


@dataclass
class SendContext:
    """What a send channel needs from its migration."""

    #: MultiFDInit_t uuid, 16 bytes
    uuid: bytes
    #: guest page size, bytes
    page_size: int
    method: Method
    #: block name -> the block's guest RAM
    views: dict[str, memoryview]
    #: block name -> its pages as ``(npages, page_size // 8)`` uint64 rows; None = no zero-page detection
    pages64: dict[str, np.ndarray] | None
    #: charged for every byte written; rate 0 = uncapped
    limiter: RateLimiter
    #: called from the channel thread with (channel id, exception) when the channel fails
    failed: Callable[[int, BaseException], None]
    #: block name -> its chunk digests: a chunk a packet covers whole is hashed as it is sent
    digests: dict[str, ChunkDigest] = field(default_factory=dict)


def pieces(bufs: Sequence[Buffer], size: int) -> list[list[memoryview]]:
    """``bufs`` cut into consecutive groups of at most ``size`` bytes each (byte views, no copies)."""
    out: list[list[memoryview]] = []
    cur: list[memoryview] = []
    room = size
    for b in bufs:
        mv = memoryview(b).cast("B")
        while mv.nbytes:
            part = mv[:room]
            cur.append(part)
            room -= part.nbytes
            mv = mv[part.nbytes :]
            if room == 0:
                out.append(cur)
                cur, room = [], size
    if cur:
        out.append(cur)
    return out


class SendChannel:
    """One multifd channel of the source: its socket, compressor and counters. Its work (handshake,
    packets, SYNC) runs on the :class:`SendWorker` that serves it, in the order it was queued."""

    def __init__(self, ctx: SendContext, cid: int, sock: socket.socket) -> None:
        self.ctx = ctx
        self.cid = cid
        self.sock = sock
        self.comp = ctx.method.compressor(cid)
        self.synced = threading.Semaphore(0)
        self.counters = ChannelCounters()
        #: the thread that writes this channel (set by :meth:`SendChannels.add`)
        self.worker: SendWorker | None = None

    def hello(self) -> None:
        """Write the channel's handshake (MultiFDInit_t)."""
        timeout = self.sock.gettimeout()
        if timeout:  # one blocking vectored write per job, the timeout kept by the kernel
            kernel_timeouts(self.sock, timeout, timeout)
        self._write([handshake.encode_init(self.ctx.uuid, self.cid)], "the handshake")

    def sync(self, num: int) -> None:
        """Write a SYNC packet numbered ``num``, then tell :meth:`SendChannels.flush` it is written."""
        self._write([packet.encode_sync(num, self.ctx.page_size)], "the SYNC packet")
        self.synced.release()

    def _write(self, bufs: list[Buffer], what: str) -> None:
        """Charge the limiter, then write ``bufs``: in one vectored send when uncapped, in pieces of
        ``PIECE_SECONDS`` of the rate (at least ``PROGRESS_BYTES``) when capped. ``what`` names the
        data in errors ("packets", "the SYNC packet"); the channel is named by the caller's context."""
        limiter = self.ctx.limiter
        rate = limiter.rate
        if not rate:
            self.counters.wire_bytes += send_buffers(self.sock, bufs, what)
            return
        for piece in pieces(bufs, max(PROGRESS_BYTES, int(rate * PIECE_SECONDS))):
            limiter.acquire(sum(len(b) for b in piece))
            self.counters.wire_bytes += send_buffers(self.sock, piece, what)

    def send_pages(self, job: _Pages) -> None:
        """Build the job's packets, write them, then count their pages: the counters say what was
        written to the socket (progress and ``remaining`` read them), not what was queued."""
        bufs: list[Buffer] = []
        normal = zero = plen = 0
        nonzero = self._nonzero(job)
        if nonzero is not None and nonzero.all():
            nonzero = None  # no zero page in the job: every packet sends all its pages
        k = 0
        for idx, num in job.packets:
            nz = None if nonzero is None else nonzero[k : k + idx.size]
            k += idx.size
            pkt, n, z, size = self._packet(job.block, idx, num, nz)
            bufs += pkt
            normal, zero, plen = normal + n, zero + z, plen + size
        self._write(bufs, "packets")
        c = self.counters
        c.packets += len(job.packets)
        c.normal += normal
        c.zero += zero
        c.payload_bytes += plen

    def _nonzero(self, job: _Pages) -> np.ndarray | None:
        """Zero-page detection for all the job's pages at once (bool per page, True = not zero), or
        None when it is off (every page is sent as normal)."""
        if self.ctx.pages64 is None:
            return None
        p64 = self.ctx.pages64[job.block]
        first, last = int(job.packets[0][0][0]), int(job.packets[-1][0][-1])
        n = sum(int(idx.size) for idx, _ in job.packets)
        if last - first + 1 == n:  # consecutive pages: a view, no gather
            return nonzero_pages(p64[first : last + 1])
        return nonzero_pages(p64[np.concatenate([idx for idx, _ in job.packets])])

    def _packet(self, block: str, idx: np.ndarray, num: int,
                nonzero: np.ndarray | None) -> tuple[list[Buffer], int, int, int]:
        """Header and payload buffers of one packet, its normal and zero page counts and its payload
        size in bytes. ``nonzero``: bool per page of ``idx`` (None: all are sent as normal).
        ``idx``: ascending page indices (a piece of a sorted page set)."""
        ctx = self.ctx
        ps = ctx.page_size
        first, n = int(idx[0]), int(idx.size)
        offsets = (idx * ps).view(np.uint64)  # page indices are >= 0
        if nonzero is None:
            normal, zero, normal_off, zero_off = idx, idx[:0], offsets, offsets[:0]
        else:
            normal, zero, normal_off, zero_off = idx[nonzero], idx[~nonzero], offsets[nonzero], offsets[~nonzero]
        mv = ctx.views[block]
        if normal.size == n and int(idx[-1]) - first + 1 == n:
            page_runs = [mv[first * ps : (first + n) * ps]]
        else:
            page_runs = [mv[f * ps : (f + c) * ps] for f, c in runs(normal)]
        t0 = time.thread_time()
        payload = self.comp.compress(page_runs) if normal.size else []
        self.counters.codec_seconds += time.thread_time() - t0
        digest = ctx.digests.get(block)
        if digest is not None:  # the pages were just read: hash their chunk while it is in cache
            digest.cover(normal, zero, mark_rest=False, span=(first, int(idx[-1])))
        plen = sum(len(b) for b in payload)
        hdr = packet.encode_packet(
            flags=ctx.method.flag,
            packet_num=num,
            ramblock=block,
            normal=normal_off,
            zero=zero_off,
            next_packet_size=plen,
            page_size=ps,
        )
        return [hdr, *payload], int(normal.size), int(zero.size), plen


class SendWorker(threading.Thread):
    """A send thread: runs the jobs of the channels it serves, one at a time, in queue order.

    A channel is served by one worker only, so its bytes keep their order. There are at most as many
    workers as cores (:data:`SEND_THREADS`): the channels' work is one Python step per job plus
    system calls and codec calls that release the GIL, and threads beyond the core count only queue
    for the GIL and evict each other's packets from the caches (docs/datapath.md, "Threads").
    A failed job ends the worker (the migration fails with the first failure).
    """

    def __init__(self, ctx: SendContext, wid: int, depth: int) -> None:
        super().__init__(name=f"multifd-send-{wid}", daemon=True)
        self.ctx = ctx
        self.q: queue.Queue[object] = queue.Queue(maxsize=depth)

    def run(self) -> None:
        ch: SendChannel | None = None
        try:
            while True:
                item = self.q.get()
                if item is _STOP:
                    return
                ch, job = cast(tuple[SendChannel, object], item)
                if job is _HELLO:
                    ch.hello()
                elif isinstance(job, _Sync):
                    ch.sync(job.num)
                elif isinstance(job, _Pages):
                    ch.send_pages(job)
        except BaseException as exc:  # noqa: BLE001 - reported to the migration thread
            self.ctx.failed(ch.cid if ch is not None else -1, exc)


class SendChannels:
    """The source's channels: packet numbering, round-robin dispatch, flush (SYNC on every channel).

    ``check`` is called while waiting and raises to abandon the wait (a failure or a cancel);
    ``timeout`` is how long the channels may write nothing at all before a flush fails.
    """

    def __init__(self, ctx: SendContext, check: Callable[[], None], timeout: float,
                 threads: int = SEND_THREADS) -> None:
        self.ctx = ctx
        self.check = check
        self.timeout = timeout
        self.channels: list[SendChannel] = []
        #: at most ``threads`` of them; channel ``cid`` is served by worker ``cid % threads``
        self.workers: list[SendWorker] = []
        self.threads = max(1, threads)
        self._packet_num = 0
        self._rr = 0

    def add(self, sock: socket.socket) -> SendChannel:
        """Open channel number ``len(channels)`` on a connected socket: its worker writes its handshake."""
        ch = SendChannel(self.ctx, len(self.channels), sock)
        if len(self.workers) < self.threads:
            w = SendWorker(self.ctx, len(self.workers), QUEUE_JOBS)
            self.workers.append(w)
            w.start()
        else:
            w = self.workers[ch.cid % self.threads]
            w.q.maxsize += QUEUE_JOBS
        ch.worker = w
        self.channels.append(ch)
        self._put(ch, _HELLO)
        return ch

    def wire_bytes(self) -> int:
        """Bytes written on all channels so far."""
        return sum(c.counters.wire_bytes for c in self.channels)

    def _next_num(self) -> int:
        n = self._packet_num
        self._packet_num += 1
        return n

    def queue_pages(self, block: str, idx: np.ndarray, page_count: int, left: Callable[[int], None]) -> None:
        """Queue the pages ``idx`` (int64, sorted) of ``block`` in packets of at most ``page_count``
        pages; ``left(n)`` hears how many of them are not queued yet, after each job."""
        remaining = int(idx.size)
        job = _Pages(block)
        for piece in chunks(idx, page_count):
            job.packets.append((piece, self._next_num()))
            remaining -= int(piece.size)
            if len(job.packets) == BATCH:
                self._dispatch(job)
                job = _Pages(block)
                left(remaining)
        if job.packets:
            self._dispatch(job)
        left(remaining)

    def _put(self, ch: SendChannel, job: object) -> None:
        assert ch.worker is not None
        while True:
            self.check()
            try:
                ch.worker.q.put((ch, job), timeout=0.05)
                return
            except queue.Full:
                continue

    def _dispatch(self, job: _Pages) -> None:
        """Round robin from the channel after the last one used, skipping channels whose thread is busy."""
        self.check()
        n = len(self.channels)
        for k in range(n):
            ch = self.channels[(self._rr + k) % n]
            assert ch.worker is not None
            try:
                ch.worker.q.put_nowait((ch, job))
                self._rr = (self._rr + k + 1) % n
                return
            except queue.Full:
                continue
        ch = self.channels[self._rr]
        self._rr = (self._rr + 1) % n
        self._put(ch, job)

    def flush(self) -> None:
        """SYNC on every channel, and wait until each has written it.

        Waits as long as the channels make progress (a slow cap or codec can take long: with a
        cap, channels queue behind each other in the limiter); progress = at least
        :data:`PROGRESS_BYTES` written on all channels together since the last progress.
        TransportError naming the channel when they wrote less than that for ``timeout`` seconds.
        """
        for ch in self.channels:
            self._put(ch, _Sync(self._next_num()))
        seen, deadline = self.wire_bytes(), time.monotonic() + self.timeout
        for ch in self.channels:
            while not ch.synced.acquire(timeout=0.05):
                self.check()
                now_bytes = self.wire_bytes()
                if now_bytes - seen >= PROGRESS_BYTES:
                    seen, deadline = now_bytes, time.monotonic() + self.timeout
                elif time.monotonic() > deadline:
                    raise TransportError(
                        f"the multifd channels wrote less than {PROGRESS_BYTES} bytes in {self.timeout:g} s "
                        f"(channel {ch.cid} still owes its SYNC)"
                    )

    def unsent(self) -> int:
        """Bytes written to the channels' sockets that the destination's kernel has not acknowledged
        yet (``SIOCOUTQ``, summed over the channels)."""
        total = 0
        for ch in self.channels:
            try:
                total += struct.unpack("@i", fcntl.ioctl(ch.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return total

    def drain(self, limit: float) -> float:
        """Wait (at most ``limit`` seconds) until the destination holds everything written, so it is
        not behind when the guest pauses; returns the seconds waited."""
        t0 = time.monotonic()
        while self.unsent() and time.monotonic() - t0 < limit:
            self.check()
            time.sleep(0.001)
        return time.monotonic() - t0

    def shutdown(self) -> None:
        """Shut every channel's socket down (wakes blocked writes)."""
        for ch in self.channels:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Ask every send thread to end after its queued jobs (a full queue: the socket shutdown ends it)."""
        for w in self.workers:
            try:
                w.q.put_nowait(_STOP)
            except queue.Full:
                pass

    def close(self) -> None:
        """Wait for every send thread (bounded) and close every channel's socket."""
        for w in self.workers:
            w.join(timeout=5)
        for ch in self.channels:
            ch.sock.close()
