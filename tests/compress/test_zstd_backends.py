"""The two zstd backends (system libzstd through ctypes, pyzstd) speak the same stream, both ways,
and the libzstd receiver decodes straight into scattered page runs."""

from __future__ import annotations

import numpy as np
import pytest

from livemig.compress import libzstd, zstd_method
from livemig.errors import PayloadError

pytestmark = pytest.mark.skipif(libzstd.LIB is None, reason="libzstd.so.1 not found (Debian package libzstd1)")


def _pages(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 64, size=n * 1024, dtype=np.uint32)  # compressible, not trivial
    return words.astype(np.uint32).tobytes()


@pytest.mark.parametrize("direction", ["lib->py", "py->lib"])
def test_backends_interoperate(direction: str) -> None:
    if direction == "lib->py":
        send, recv = zstd_method._LibSend(1), zstd_method._Recv(4096)
    else:
        send, recv = zstd_method._Send(1), zstd_method._LibRecv(4096)
    for k in range(5):  # several packets: one frame per channel, never ended
        data = _pages(128 if k % 2 else 17, k)
        payload = b"".join(bytes(b) for b in send.compress([memoryview(data)[:8192], memoryview(data)[8192:]]))
        if k % 2:  # as a channel calls it: a view of its receive buffer, decoded into guest RAM
            out = bytearray(len(data))
            recv.decompress_into(memoryview(bytearray(payload)), [memoryview(out)], 4096)
            assert out == data
        else:
            assert bytes(recv.decompress(payload, len(data) // 4096)) == data


def test_decompress_into_scattered_runs() -> None:
    send, recv = zstd_method._LibSend(3), zstd_method._LibRecv(4096)
    data = _pages(10, 1)
    payload = b"".join(bytes(b) for b in send.compress([data]))
    ram = bytearray(40 * 4096)
    mv = memoryview(ram)
    outs = [mv[4096 : 3 * 4096], mv[20 * 4096 : 27 * 4096], mv[39 * 4096 :]]  # 2 + 7 + 1 pages
    recv.decompress_into(payload, outs)
    assert bytes(ram[4096 : 3 * 4096]) == data[: 2 * 4096]
    assert bytes(ram[20 * 4096 : 27 * 4096]) == data[2 * 4096 : 9 * 4096]
    assert bytes(ram[39 * 4096 :]) == data[9 * 4096 :]
    untouched = np.frombuffer(ram, np.uint8).reshape(40, 4096)[[0, 3, 10, 19, 27, 38]]
    assert not untouched.any()


def test_lib_receiver_rejects_lies() -> None:
    send = zstd_method._LibSend(1)
    data = _pages(4, 2)
    payload = b"".join(bytes(b) for b in send.compress([data]))
    for pages in (3, 5):
        with pytest.raises(PayloadError, match="zstd"):
            zstd_method._LibRecv(4096).decompress(payload, pages)
    with pytest.raises(PayloadError, match="zstd"):
        zstd_method._LibRecv(4096).decompress(b"\x28\xb5\x2f\xfd" + b"\xff" * 64, 1)


def test_packet_compressor_writes_one_whole_frame_per_packet() -> None:
    """Each payload is one frame declaring its packet's size (QEMU's receiver reads a sequence of
    them as it reads its own never-ended frame); the runs of a packet of several are gathered in
    order; the receiver decodes such packets in one call each."""
    import pyzstd

    comp = libzstd.PacketCompressor(1)
    endless = pyzstd.EndlessZstdDecompressor()
    dec = libzstd.PacketDecompressor()
    sizes = [128, 17, 128, 3, 64, 128, 1]
    for k, n in enumerate(sizes):
        data = _pages(n, k % 3)
        half = 4096 * (n // 2)
        runs = [memoryview(data)] if k % 2 else [memoryview(data)[:half], memoryview(data)[half:]]
        payload = comp.compress(runs)
        assert payload[:4] == libzstd.FRAME_MAGIC
        assert pyzstd.decompress(payload) == data  # a whole frame: decodes alone
        assert endless.decompress(payload) == data and endless.at_frame_edge
        out = bytearray(len(data))
        dec.decompress_into(payload, [memoryview(out)])
        assert out == data
    assert dec.whole_frames == len(sizes) and dec.at_frame_edge
    with pytest.raises(PayloadError, match="more than 524288 bytes"):
        comp.compress([bytes(512 * 1024 + 4096)])


def test_receiver_decodes_a_never_ended_frame_with_the_streaming_decoder() -> None:
    """QEMU's stream (one frame per channel, a flush per packet) never takes the one-call path."""
    send, dec = zstd_method._Send(1), libzstd.PacketDecompressor()
    for k in range(4):
        data = _pages(128, k)
        payload = b"".join(bytes(b) for b in send.compress([data]))
        out = bytearray(len(data))
        dec.decompress_into(payload, [memoryview(out)])
        assert out == data
        assert not dec.at_frame_edge
    assert dec.whole_frames == 0


def test_receiver_accepts_frames_ending_inside_a_packet_as_qemu_does() -> None:
    """Two whole frames in one packet (QEMU's receiver takes them: a frame's end is not an error)
    decode through the streaming decoder, which then waits at a frame edge again."""
    comp, dec = libzstd.PacketCompressor(1), libzstd.PacketDecompressor()
    data = _pages(6, 9)
    payload = comp.compress([data[: 2 * 4096]]) + comp.compress([data[2 * 4096 :]])
    out = bytearray(len(data))
    dec.decompress_into(payload, [memoryview(out)])
    assert out == data and dec.whole_frames == 0 and dec.at_frame_edge
    with pytest.raises(PayloadError, match="more than"):
        dec.decompress_into(payload, [memoryview(bytearray(5 * 4096))])


def test_packet_compressor_output_stays_within_a_default_decoder_window() -> None:
    """The frame header declares a window a default decoder accepts (<= 2**27, QEMU's receiver)."""
    import pyzstd

    payload = libzstd.PacketCompressor(20).compress([_pages(128, 5)])
    dec = pyzstd.ZstdDecompressor(option={pyzstd.DParameter.windowLogMax: libzstd.WINDOW_LOG_MAX})
    assert dec.decompress(payload) == _pages(128, 5)
