"""The multifd channel workers, one thread per channel on each side (docs/wire.md, "Multifd packet").

Send side: :class:`SendChannels` numbers packets and hands page jobs round robin to
:class:`SendChannel` threads, which detect zero pages, compress and write packets in order; a flush
puts a SYNC packet on every channel and waits until each has written it. Every byte a channel writes
(handshake, headers, payloads, SYNC) is charged to the bandwidth limiter first.

Receive side: :class:`RecvChannel` validates every packet header (magic, version, counts, flags,
block, offsets inside the block) before a byte lands in guest RAM. A raw payload (``none``) is read
straight into guest RAM; any other is bounded (``MAX_PAYLOAD``), decoded to exactly the packet's
pages and scattered. A SYNC packet waits at the destination's flush barrier, so a re-sent page never
lands before an older copy.

A worker sees only its context (:class:`SendContext`, :class:`RecvContext`): page size, method, RAM
views, limiter, counters and callbacks for failure, sync and progress; never the Source or
Destination object.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..compress import MAX_PAYLOAD, Buffer, Method
from ..errors import TransportError, WireError
from ..guest.base import RamBlock
from ..ram.digest import ChunkDigest
from ..ram.pages import chunks, nonzero_pages, runs
from ..transport.ratelimit import RateLimiter
from ..transport.sockets import recv_exact_into, recv_into_buffers, send_buffers
from ..wire import handshake, packet
from .stats import ChannelCounters

#: packets per channel job: fewer queue hand-offs and syscalls, same packets on the wire
BATCH = 4


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


class SendChannel(threading.Thread):
    """One multifd channel: handshake, then zero detection, compression and sending, in job order."""

    def __init__(self, ctx: SendContext, cid: int, sock: socket.socket) -> None:
        super().__init__(name=f"multifd-send-{cid}", daemon=True)
        self.ctx = ctx
        self.cid = cid
        self.sock = sock
        self.comp = ctx.method.compressor(cid)
        self.q: queue.Queue[object] = queue.Queue(maxsize=4)
        self.synced = threading.Semaphore(0)
        self.counters = ChannelCounters()

    def run(self) -> None:
        try:
            self._write([handshake.encode_init(self.ctx.uuid, self.cid)], "handshake")
            while True:
                job = self.q.get()
                if job is _STOP:
                    return
                if isinstance(job, _Sync):
                    self._write([packet.encode_sync(job.num, self.ctx.page_size)], "sync")
                    self.synced.release()
                elif isinstance(job, _Pages):
                    self._send_pages(job)
        except BaseException as exc:  # noqa: BLE001 - reported to the migration thread
            self.ctx.failed(self.cid, exc)

    def _write(self, bufs: list[Buffer], what: str) -> None:
        """Charge the limiter, then write ``bufs`` in one vectored send."""
        self.ctx.limiter.acquire(sum(len(b) for b in bufs))
        self.counters.wire_bytes += send_buffers(self.sock, bufs, f"multifd channel {self.cid} {what}")

    def _send_pages(self, job: _Pages) -> None:
        if self.ctx.limiter.rate:
            # capped: one packet at a time, so progress (and the cap) moves in packet steps
            for idx, num in job.packets:
                self._write(self._packet(job.block, idx, num), "packets")
            return
        bufs: list[Buffer] = []
        for idx, num in job.packets:
            bufs += self._packet(job.block, idx, num)
        self._write(bufs, "packets")

    def _packet(self, block: str, idx: np.ndarray, num: int) -> list[Buffer]:
        """Header and payload buffers of one packet; counts its pages."""
        ctx = self.ctx
        ps = ctx.page_size
        first, n = int(idx[0]), int(idx.size)
        contiguous = int(idx[-1]) - first + 1 == n
        if ctx.pages64 is not None:
            p64 = ctx.pages64[block]
            nonzero = nonzero_pages(p64[first : first + n] if contiguous else p64[idx])
            normal = idx[nonzero]
            zero = idx[~nonzero]
        else:
            normal, zero = idx, idx[:0]
        mv = ctx.views[block]
        if normal.size == n and contiguous:
            page_runs = [mv[first * ps : (first + n) * ps]]
        else:
            page_runs = [mv[f * ps : (f + c) * ps] for f, c in runs(normal)]
        t0 = time.thread_time()
        payload = self.comp.compress(page_runs) if normal.size else []
        self.counters.codec_seconds += time.thread_time() - t0
        plen = sum(len(b) for b in payload)
        hdr = packet.encode_packet(
            flags=ctx.method.flag,
            packet_num=num,
            ramblock=block,
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


class SendChannels:
    """The source's channels: packet numbering, round-robin dispatch, flush (SYNC on every channel).

    ``check`` is called while waiting and raises to abandon the wait (a failure or a cancel);
    ``timeout`` is how long the channels may write nothing at all before a flush fails.
    """

    def __init__(self, ctx: SendContext, check: Callable[[], None], timeout: float) -> None:
        self.ctx = ctx
        self.check = check
        self.timeout = timeout
        self.channels: list[SendChannel] = []
        self._packet_num = 0
        self._rr = 0

    def add(self, sock: socket.socket) -> SendChannel:
        """Start channel number ``len(channels)`` on a connected socket (it sends its handshake)."""
        ch = SendChannel(self.ctx, len(self.channels), sock)
        self.channels.append(ch)
        ch.start()
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
        while True:
            self.check()
            try:
                ch.q.put(job, timeout=0.05)
                return
            except queue.Full:
                continue

    def _dispatch(self, job: _Pages) -> None:
        """Round robin from the channel after the last one used, skipping busy channels."""
        self.check()
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
        self._put(ch, job)

    def flush(self) -> None:
        """SYNC on every channel, and wait until each has written it.

        Waits as long as some channel makes progress (a slow cap or codec can take long: with a
        cap, channels queue behind each other in the limiter); TransportError when no channel wrote
        anything for ``timeout`` seconds.
        """
        for ch in self.channels:
            self._put(ch, _Sync(self._next_num()))
        seen, deadline = self.wire_bytes(), time.monotonic() + self.timeout
        for ch in self.channels:
            while not ch.synced.acquire(timeout=0.05):
                self.check()
                now_bytes = self.wire_bytes()
                if now_bytes != seen:
                    seen, deadline = now_bytes, time.monotonic() + self.timeout
                elif time.monotonic() > deadline:
                    raise TransportError(
                        f"multifd channel {ch.cid} wrote nothing for {self.timeout:.0f} s before its SYNC"
                    )

    def shutdown(self) -> None:
        """Shut every channel's socket down (wakes blocked writes)."""
        for ch in self.channels:
            try:
                ch.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Ask every channel to end after its queued jobs (a full queue: the socket shutdown ends it)."""
        for ch in self.channels:
            try:
                ch.q.put_nowait(_STOP)
            except queue.Full:
                pass

    def close(self) -> None:
        """Wait for every channel thread (bounded) and close its socket."""
        for ch in self.channels:
            ch.join(timeout=5)
            ch.sock.close()


@dataclass
class RecvContext:
    """What a receive channel needs from its migration (dicts by block name, filled at configure)."""

    #: guest page size, bytes
    page_size: int
    method: Method
    blocks: dict[str, RamBlock]
    views: dict[str, memoryview]
    #: block name -> bool per page, True once the page arrived
    received: dict[str, np.ndarray]
    digests: dict[str, ChunkDigest]
    #: True while the migration as a whole makes progress (a quiet socket then keeps waiting)
    alive: Callable[[], bool]
    #: a packet arrived (feeds the destination's watchdog)
    progress: Callable[[], None]
    #: a SYNC packet was read on channel ``cid``: blocks until the main stream's flush meets it
    sync: Callable[[int], None]
    #: called from the channel thread with (exception, where) when the channel fails
    failed: Callable[[BaseException, str], None]


class RecvChannel(threading.Thread):
    """One multifd channel of the destination, after its handshake was read."""

    def __init__(self, ctx: RecvContext, cid: int, sock: socket.socket) -> None:
        super().__init__(name=f"multifd-recv-{cid}", daemon=True)
        self.ctx = ctx
        self.cid = cid
        self.sock = sock
        self.decomp = ctx.method.decompressor(cid)
        self.counters = ChannelCounters()
        self.counters.wire_bytes += handshake.INIT_SIZE
        self.current: int | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            where = f"multifd channel {self.cid}"
            if self.current is not None:
                where += f", packet {self.current}"
            self.ctx.failed(exc, where)

    def _loop(self) -> None:
        ctx = self.ctx
        ps = ctx.page_size
        plen = packet.packet_len(ps)
        hbuf = memoryview(bytearray(plen))
        pbuf = memoryview(bytearray(MAX_PAYLOAD))
        while True:
            self.current = None
            if not recv_exact_into(self.sock, hbuf, "packet header", eof_ok=True, alive=ctx.alive):
                return
            hdr = packet.decode_packet(hbuf, ps)
            self.current = hdr.packet_num
            if hdr.has_data:
                block = ctx.blocks.get(hdr.ramblock)
                if block is None:
                    raise WireError("multifd: unknown ram block", hdr.ramblock, f"one of {sorted(ctx.blocks)}")
                packet.check_packet(hdr, method_flag=ctx.method.flag, block_size=block.size, page_size=ps)
                normal = (hdr.normal_offsets // ps).astype(np.int64)
                zero = (hdr.zero_offsets // ps).astype(np.int64)
                received = ctx.received[block.name]
                if normal.size:
                    self._normal(hdr, block, normal, pbuf)
                elif hdr.next_packet_size:
                    raise WireError("multifd: next_packet_size of a packet without normal pages",
                                    hdr.next_packet_size, 0)
                if zero.size:
                    again = zero[received[zero]]
                    if again.size:
                        block.pages[again] = 0
                    received[zero] = True
                touched = np.concatenate((normal, zero)) if zero.size else normal
                ctx.digests[block.name].mark_pages(touched)
                ctx.progress()
                c = self.counters
                c.packets += 1
                c.normal += int(normal.size)
                c.zero += int(zero.size)
                c.wire_bytes += plen + hdr.next_packet_size
                c.payload_bytes += hdr.next_packet_size
            elif hdr.next_packet_size:
                raise WireError("multifd: next_packet_size of an empty packet", hdr.next_packet_size, 0)
            if hdr.is_sync:
                ctx.sync(self.cid)

    def _normal(self, hdr: packet.PacketHeader, block: RamBlock, normal: np.ndarray, pbuf: memoryview) -> None:
        ctx = self.ctx
        ps = ctx.page_size
        n = int(normal.size)
        mv = ctx.views[block.name]
        outs = [mv[f * ps : (f + c) * ps] for f, c in runs(normal)]
        if ctx.method.raw_payload:
            want = n * ps
            if hdr.next_packet_size != want:
                raise WireError(f"multifd: {ctx.method.name} packet size", hdr.next_packet_size, want)
            recv_into_buffers(self.sock, outs, f"{n} pages of packet {hdr.packet_num}", alive=ctx.alive)
        else:
            size = hdr.next_packet_size
            if size > MAX_PAYLOAD:
                raise WireError(f"multifd: {ctx.method.name}: received unexpectedly large packet", size,
                                f"at most {MAX_PAYLOAD}")
            recv_exact_into(self.sock, pbuf[:size], f"payload of packet {hdr.packet_num}", alive=ctx.alive)
            t0 = time.thread_time()
            # offsets were checked against the block: the decoder writes only this packet's pages
            self.decomp.decompress_into(pbuf[:size], outs, ps)
            self.counters.codec_seconds += time.thread_time() - t0
        ctx.received[block.name][normal] = True
