"""The destination's multifd channels (docs/wire.md, "Multifd packet"); the source's are in
:mod:`.multifd_send`.

Receive side: :class:`RecvChannel` validates every packet header (magic, version, counts, flags,
block, offsets inside the block) before a byte lands in guest RAM. A raw payload (``none``) is read
straight into guest RAM; any other is bounded (``MAX_PAYLOAD``), decoded to exactly the packet's
pages and scattered. A SYNC packet waits at the destination's flush barrier, so a re-sent page never
lands before an older copy.

Progress is measured in bytes, not whole packets, on both sides: a side's stall timer restarts only
once at least :data:`.multifd_send.PROGRESS_BYTES` (one page) moved since its last restart. So a slow cap never
looks like a stall, while a peer dribbling a byte now and then still fails within the timeout.

A worker sees only its context (:class:`SendContext`, :class:`RecvContext`): page size, method, RAM
views, limiter, counters and callbacks for failure, sync and progress; never the Source or
Destination object.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..compress import MAX_PAYLOAD, Method
from ..errors import WireError
from ..guest.base import RamBlock
from ..ram.digest import ChunkDigest
from ..transport.sockets import kernel_timeouts, recv_exact_into, recv_into_buffers
from ..wire import handshake, packet
from .stats import ChannelCounters

#: a receive channel's read returns at least this often (seconds; the kernel's SO_RCVTIMEO) with the
#: bytes that came, so progress shows while a packet crawls through a slow cap
RECV_WAKE = 0.1
#: a receive channel's socket buffer (SO_RCVBUF, bytes; the kernel doubles it): bounds what can be in
#: flight to a destination that is behind (Linux's autotuning lets it grow to tcp_rmem's maximum, tens
#: of MiB per channel), so the source's view of what moved stays close to what landed
RECV_BUFFER = 1 << 20

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
    #: ``progress(nbytes)``: this many more bytes arrived on a channel (feeds the destination's
    #: watchdog, which counts them against :data:`PROGRESS_BYTES`)
    progress: Callable[[int], None]
    #: a SYNC packet was read on channel ``cid``: blocks until the main stream's flush meets it
    sync: Callable[[int], None]
    #: called from the channel thread with (exception, where) when the channel fails
    failed: Callable[[BaseException, str], None]
    #: ignore the next_packet_size of a packet without pages, as QEMU's receiver does (a QEMU 7.2
    #: source leaves a stale value there and sends no payload); livemig's own sources send 0
    stale_empty_size: bool = False
    #: post-copy: ``landed(block, normal, zero)`` after a packet's pages landed (per-page hashes,
    #: livemig.migration.pagehash); None when post-copy is off
    landed: Callable[[str, np.ndarray, np.ndarray], None] | None = None


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
            self.ctx.progress(handshake.INIT_SIZE)
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
        kernel_timeouts(self.sock, RECV_WAKE, RECV_WAKE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        while True:
            self.current = None
            if not recv_exact_into(self.sock, hbuf, "packet header", eof_ok=True, alive=ctx.alive,
                                   progress=ctx.progress):
                return
            hdr = packet.decode_packet(hbuf, ps)
            self.current = hdr.packet_num
            if hdr.has_data:
                block = ctx.blocks.get(hdr.ramblock)
                if block is None:
                    raise WireError("multifd: unknown ram block", hdr.ramblock, f"one of {sorted(ctx.blocks)}")
                # offsets checked: inside the block
                normal, zero, normal_runs, span = packet.check_packet(hdr, method_flag=ctx.method.flag,
                                                                      block_size=block.size, page_size=ps)
                received = ctx.received[block.name]
                if normal_runs:
                    self._normal(hdr, block, normal_runs, pbuf)
                    for f, n in normal_runs:
                        received[f : f + n] = True
                elif hdr.next_packet_size:
                    raise WireError("multifd: next_packet_size of a packet without normal pages",
                                    hdr.next_packet_size, 0)
                if zero.size:
                    again = zero[received[zero]]
                    if again.size:
                        block.pages[again] = 0
                    received[zero] = True
                ctx.digests[block.name].cover(normal, zero, mark_rest=True, span=span)
                if ctx.landed is not None:
                    ctx.landed(block.name, normal, zero)
                c = self.counters
                c.packets += 1
                c.normal += int(normal.size)
                c.zero += int(zero.size)
                c.wire_bytes += plen + hdr.next_packet_size
                c.payload_bytes += hdr.next_packet_size
            elif hdr.next_packet_size and not ctx.stale_empty_size:
                raise WireError("multifd: next_packet_size of an empty packet", hdr.next_packet_size, 0)
            if hdr.is_sync:
                ctx.sync(self.cid)

    def _normal(self, hdr: packet.PacketHeader, block: RamBlock, normal_runs: list[tuple[int, int]],
                pbuf: memoryview) -> None:
        """Land the packet's normal pages (``normal_runs``: (first page, count)) in guest RAM."""
        ctx = self.ctx
        ps = ctx.page_size
        n = hdr.normal_pages
        mv = ctx.views[block.name]
        outs = [mv[f * ps : (f + c) * ps] for f, c in normal_runs]
        if ctx.method.raw_payload:
            want = n * ps
            if hdr.next_packet_size != want:
                raise WireError(f"multifd: {ctx.method.name} packet size", hdr.next_packet_size, want)
            self._recv(outs, f"{n} pages")
        else:
            size = hdr.next_packet_size
            if size > MAX_PAYLOAD:
                raise WireError(f"multifd: {ctx.method.name}: received unexpectedly large packet", size,
                                f"at most {MAX_PAYLOAD}")
            self._recv([pbuf[:size]], f"the {size}-byte payload")
            t0 = time.thread_time()
            # offsets were checked against the block: the decoder writes only this packet's pages
            self.decomp.decompress_into(pbuf[:size], outs, ps)
            self.counters.codec_seconds += time.thread_time() - t0

    def _recv(self, bufs: list[memoryview], what: str) -> None:
        """Fill ``bufs``: one blocking read at full speed; under a slow cap the kernel's receive
        timeout (:data:`RECV_WAKE`) returns what came so far, reported to ``ctx.progress``, so a
        packet crawling in shows progress about every RECV_WAKE seconds."""
        recv_into_buffers(self.sock, bufs, what, alive=self.ctx.alive, progress=self.ctx.progress)
