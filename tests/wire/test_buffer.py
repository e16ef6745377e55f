"""The reader's receive buffer: offsets relative to the unconsumed bytes, compaction on feed."""

from __future__ import annotations

import struct

from livemig.wire.buffer import ReceiveBuffer


def test_peek_unpack_take_skip() -> None:
    rx = ReceiveBuffer()
    rx.feed(b"\x01\x00\x00\x00\x02abc")
    assert len(rx) == 8 and rx.byte() == 1 and rx.byte(4) == 2
    assert rx.unpack(struct.Struct(">BI")) == (1, 2)
    assert rx.peek(5, 2) == b"ab" and len(rx) == 8
    rx.skip(5)
    assert rx.byte() == ord("a") and rx.unpack(struct.Struct(">B"), 2) == (ord("c"),)
    assert rx.take(3) == b"abc" and len(rx) == 0 and not rx


def test_feed_compacts_consumed_bytes() -> None:
    rx = ReceiveBuffer()
    rx.feed(bytes(100))
    rx.skip(60)  # more than half consumed: the next feed drops them
    rx.feed(b"xy")
    assert rx.allocated == 42 and len(rx) == 42 and rx.peek(40, 2) == b"xy"
    rx.skip(10)  # less than half consumed: kept until more is consumed
    rx.feed(b"z")
    assert rx.allocated == 43 and len(rx) == 33


def test_accepts_every_buffer_kind() -> None:
    rx = ReceiveBuffer()
    for chunk in (b"a", bytearray(b"b"), memoryview(b"cd")[1:]):
        rx.feed(chunk)
    assert rx.take(3) == b"abd"
