"""Post-copy's fault path on its own: a destination's dropped pages fault, each is requested once,
placing it (a page, or a zero page) wakes every thread waiting on it with the source's bytes, never
the stale precopy ones; a page placed from the stream while its request is in flight is not sent
again; the source serves requests only for pages it has not sent."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from livemig.errors import MigrationError, WireError
from livemig.guest.base import RamBlock
from livemig.guest.uffd import unavailable
from livemig.migration import protocol
from livemig.migration.postcopy_dest import PostcopyDestination
from livemig.migration.postcopy_source import PostcopySource
from livemig.wire.stream import Page, PostcopyAdvise, PostcopyDiscard, PostcopyListen, ZeroPage

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")
PAGE = 4096


class _Rp:
    def __init__(self) -> None:
        self.sent: queue.Queue[protocol.Message] = queue.Queue()

    def send(self, msg: protocol.Message) -> None:
        self.sent.put(msg)


class _Dst:
    """What PostcopyDestination uses of a Destination."""

    def __init__(self, block: RamBlock) -> None:
        self.blocks = {block.name: block}
        self.page_size = PAGE
        self.received = {block.name: np.ones(block.npages, dtype=bool)}
        self.handover = SimpleNamespace(rp=_Rp())
        self.main = None
        self.failures: list[tuple[BaseException, str]] = []

    def stop_hashing(self) -> None:
        pass

    def fail(self, exc: BaseException, where: str) -> None:
        self.failures.append((exc, where))


@pytest.fixture
def listening() -> Any:
    """A 16-page block holding precopy bytes, pages 4..11 dropped and registered."""
    block = RamBlock("pc.ram", 16 * PAGE)
    block.pages[:] = np.random.default_rng(5).integers(1, 256, (16, PAGE), dtype=np.uint8)  # no zero byte
    dst = _Dst(block)
    pc = PostcopyDestination(dst)  # type: ignore[arg-type]
    pc.command(PostcopyAdvise(PAGE, PAGE))
    pc.command(PostcopyDiscard("pc.ram", ((4 * PAGE, 8 * PAGE),)))
    pc.command(PostcopyListen())
    yield block, dst, pc
    pc.close()
    block.close()


def _toucher(block: RamBlock, page: int, out: list[bytes]) -> threading.Thread:
    def run() -> None:
        block.ensure_pages(np.array([page]))  # faults with the GIL released; returns once placed
        out.append(bytes(block.pages[page]))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_dropped_pages_are_missing_and_the_rest_present(listening: Any) -> None:
    block, dst, _ = listening
    assert block.present is not None
    assert list(np.flatnonzero(~block.present)) == list(range(4, 12))
    assert not dst.received["pc.ram"][4:12].any() and dst.received["pc.ram"][12:].all()


def test_a_fault_is_requested_once_and_the_placed_page_wakes_every_waiter(listening: Any) -> None:
    block, dst, pc = listening
    seen: list[bytes] = []
    threads = [_toucher(block, 5, seen) for _ in range(3)]
    msg = dst.handover.rp.sent.get(timeout=5)
    assert msg == protocol.ReqPages("pc.ram", 5 * PAGE, PAGE)
    new = bytes(range(256)) * (PAGE // 256)
    pc._place(Page("pc.ram", 5 * PAGE, new))
    for t in threads:
        t.join(timeout=5)
        assert not t.is_alive()
    assert seen == [new] * 3  # the source's bytes, not the precopy ones that were dropped
    assert dst.handover.rp.sent.empty() and pc.pages_requested == 1 and len(pc.latencies_us) == 1
    assert block.present[5] and not dst.failures


def test_a_zero_page_faulted_reads_zeros_not_the_stale_precopy_bytes(listening: Any) -> None:
    block, dst, pc = listening
    seen: list[bytes] = []
    t = _toucher(block, 6, seen)
    assert dst.handover.rp.sent.get(timeout=5) == protocol.ReqPages("pc.ram", 6 * PAGE, PAGE)
    pc._place(ZeroPage("pc.ram", 6 * PAGE))
    t.join(timeout=5)
    assert seen == [bytes(PAGE)]


def test_a_page_in_flight_when_faulted_is_placed_once(listening: Any) -> None:
    block, dst, pc = listening
    seen: list[bytes] = []
    t = _toucher(block, 7, seen)
    assert isinstance(dst.handover.rp.sent.get(timeout=5), protocol.ReqPages)
    # the background stream's copy (sent before the request reached the source) lands first
    data = b"\x42" * PAGE
    pc._place(Page("pc.ram", 7 * PAGE, data))
    t.join(timeout=5)
    assert seen == [data] and len(pc.latencies_us) == 1
    with pytest.raises(WireError, match="post-copy page 7 of 'pc.ram': received 'already present'"):
        pc._place(Page("pc.ram", 7 * PAGE, data))  # a second copy is a source bug, refused


def test_the_source_serves_only_pages_not_sent_yet() -> None:
    block = RamBlock("pc.ram", 16 * PAGE)
    src = SimpleNamespace(guest=SimpleNamespace(blocks=[block]), page_size=PAGE)
    pcs = PostcopySource(src, 1)  # type: ignore[arg-type]
    todo = np.zeros(16, dtype=bool)
    todo[4:12] = True
    pcs._todo["pc.ram"] = todo
    written: list[list[int]] = []

    def write(name: str, idx: np.ndarray) -> int:
        written.append(idx.tolist())
        todo[idx] = False
        return int(idx.size)

    pcs._write = write  # type: ignore[method-assign]
    for start, length in ((5 * PAGE, PAGE), (5 * PAGE, PAGE), (0, PAGE), (10 * PAGE, 3 * PAGE)):
        pcs._requests.put(protocol.ReqPages("pc.ram", start, length))
    assert pcs._serve_requests() == 3
    assert written == [[5], [10, 11]]  # page 5 once; pages 0 and 12 were not dropped
    pcs._requests.put(protocol.ReqPages("vga.ram", 0, PAGE))
    with pytest.raises(MigrationError, match="unknown RAM block 'vga.ram'"):
        pcs._serve_requests()
    pcs._requests.put(protocol.ReqPages("pc.ram", 16 * PAGE, PAGE))
    with pytest.raises(MigrationError, match="outside RAM block 'pc.ram'"):
        pcs._serve_requests()
    block.close()
