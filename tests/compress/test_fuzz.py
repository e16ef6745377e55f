"""Mutated payloads for the offload methods' receivers: the only outcomes are PayloadError or exactly
the packet's size of output (formats without a checksum per byte may decode a flipped bit)."""

from __future__ import annotations

import random

import pytest

from livemig.accel.sample import sample_pages
from livemig.compress import create_method
from livemig.errors import PayloadError

PAGE = 4096


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    b = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[pos : pos + rng.randint(1, 64)]
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 64))
        elif op == 3 and len(b) > 4:
            b[pos : pos + 4] = rng.choice([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\0\0\x10\0", b"\0\0\x10\x01"])
        else:
            b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


@pytest.mark.parametrize("name", ["qatzip", "qpl", "uadk"])
def test_mutated_payloads(name: str) -> None:
    rng = random.Random(name)
    data = sample_pages(24, "mixed", seed=11)
    method = create_method(name, 1)
    payload = b"".join(bytes(b) for b in method.compressor(0).compress([data]))
    recv = method.decompressor(0)
    outcomes = {"error": 0, "decoded": 0}
    for _ in range(400):
        bad = _mutate(rng, payload)
        try:
            out = recv.decompress(bad, 24)
        except PayloadError as exc:
            assert str(exc).startswith(f"{name}: ")
            outcomes["error"] += 1
        else:
            assert len(out) == len(data)
            outcomes["decoded"] += 1
    assert outcomes["error"] > 300, outcomes
    assert bytes(recv.decompress(payload, 24)) == data  # the receiver is still usable
