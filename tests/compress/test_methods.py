"""Every registered compression method, at every level, through the registry's public interface."""

from __future__ import annotations

import functools
import random

import pytest

from livemig.accel.sample import KINDS, sample_pages
from livemig.compress import MAX_PAYLOAD, create_method, get_method, method_names
from livemig.errors import ParameterError, PayloadError

PAGE = 4096


def _levels(name: str) -> list[int]:
    levels = get_method(name).levels
    return [1] if levels is None else list(range(levels[0], levels[1] + 1))


CASES = [(name, level) for name in method_names() for level in _levels(name)]

#: packets per data kind: (pages, where the runs are split); several packets share one channel stream
PACKETS = [(128, (1, 64)), (1, ()), (37, (5, 6, 20))]


def _runs(data: bytes, splits: tuple[int, ...]) -> list[memoryview]:
    mv = memoryview(data)
    edges = [0, *(s * PAGE for s in splits), len(data)]
    return [mv[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@functools.cache
def _sample(pages: int, kind: str, seed: int) -> bytes:
    return sample_pages(pages, kind, seed)


@pytest.mark.parametrize(("name", "level"), CASES, ids=[f"{n}-{lv}" for n, lv in CASES])
def test_round_trip(name: str, level: int) -> None:
    method = create_method(name, level)
    assert method.backend()
    send, recv = method.compressor(0), method.decompressor(0)
    for k, kind in enumerate(KINDS):
        for p, (pages, splits) in enumerate(PACKETS):
            data = _sample(pages, kind, 100 * k + p)
            payload = b"".join(bytes(b) for b in send.compress(_runs(data, splits)))
            assert len(payload) <= MAX_PAYLOAD
            out = recv.decompress(payload, pages)
            assert bytes(out) == data, f"{name}-{level} {kind} packet {p}"


REJECT = method_names()


def _packet(name: str) -> tuple[object, bytes, bytes]:
    method = create_method(name, 1)
    data = sample_pages(16, "mixed", seed=7)
    payload = b"".join(bytes(b) for b in method.compressor(0).compress([data]))
    return method, data, payload


@pytest.mark.parametrize("name", REJECT)
def test_rejects_bad_payloads(name: str) -> None:
    method, data, payload = _packet(name)
    make = method.decompressor  # type: ignore[attr-defined]
    # truncated
    with pytest.raises(PayloadError, match=name):
        make(0).decompress(payload[: len(payload) // 2], 16)
    # lying about the page count, both ways
    with pytest.raises(PayloadError, match=name):
        make(0).decompress(payload, 17)
    with pytest.raises(PayloadError, match=name):
        make(0).decompress(payload, 15)
    # trailing garbage
    with pytest.raises(PayloadError, match=name):
        make(0).decompress(payload + b"\x01\x02\x03\x04" * 8, 16)
    if name == "none":
        return
    # garbage and corruption in many places: an error or (for formats without checksums) wrong
    # bytes of the right size, never anything else
    rng = random.Random(1)
    with pytest.raises(PayloadError, match=name):
        make(0).decompress(rng.randbytes(len(payload)), 16)
    for _ in range(40):
        bad = bytearray(payload)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        try:
            out = make(0).decompress(bytes(bad), 16)
        except PayloadError as exc:
            assert name in str(exc)
        else:
            assert len(out) == len(data)


@pytest.mark.parametrize("name", ["qatzip", "qpl", "uadk"])
def test_rejects_oversized_payload(name: str) -> None:
    method = create_method(name, 1)
    with pytest.raises(PayloadError, match=f"{name}.*large"):
        method.decompressor(0).decompress(bytes(MAX_PAYLOAD + 1), 128)


@pytest.mark.parametrize("name", ["qatzip", "qpl", "uadk"])
def test_empty_packet(name: str) -> None:
    method = create_method(name, 1)
    assert b"".join(bytes(b) for b in method.compressor(0).compress([])) == b""
    assert bytes(method.decompressor(0).decompress(b"", 0)) == b""
    with pytest.raises(PayloadError):
        method.decompressor(0).decompress(b"\x00", 0)


def test_qatzip_level_range() -> None:
    with pytest.raises(ParameterError, match="between 1 and 9"):
        create_method("qatzip", 10)
    with pytest.raises(ParameterError, match="between 1 and 9"):
        create_method("qatzip", 0)
