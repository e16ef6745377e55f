"""``none``: the normal pages' raw bytes, concatenated (docs/wire.md, "Payloads")."""

from __future__ import annotations

from collections.abc import Sequence

from .._types import Buffer
from ..errors import PayloadError
from ..wire.constants import FLAG_NOCOMP
from .base import Compressor, Decompressor, Method


class _Send(Compressor):
    def compress(self, runs: Sequence[Buffer]) -> list[Buffer]:
        return list(runs)


class _Recv(Decompressor):
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def decompress(self, payload: Buffer, normal_pages: int) -> Buffer:
        want = normal_pages * self.page_size
        if len(payload) != want:
            raise PayloadError(f"none: payload is {len(payload)} bytes, expected {want}")
        return payload


class NoComp(Method):
    name = "none"
    flag = FLAG_NOCOMP
    raw_payload = True

    def backend(self) -> str:
        return "cpu: no compression (pages sent from guest RAM without a copy)"

    def compressor(self, channel: int) -> Compressor:
        return _Send()

    def decompressor(self, channel: int) -> Decompressor:
        return _Recv(self.page_size)


METHOD = NoComp
