"""A test double of the guest interface: RAM only, writes made by the test itself and logged."""

from __future__ import annotations

import json

import numpy as np

from livemig.guest.base import Guest, GuestConfig, RamBlock


class FakeGuest(Guest):
    kind = "portable"

    def __init__(self, config: GuestConfig, incoming: bool = False) -> None:
        super().__init__(config)
        self.blocks = [RamBlock("pc.ram", config.memory)]
        self._dirty = np.zeros(self.blocks[0].npages, dtype=bool)
        self._running = False
        self.state = b""
        self.resumed = 0
        if not incoming:
            rng = np.random.default_rng(config.seed)
            pages = self.blocks[0].pages
            n = pages.shape[0]
            # a third random, a third zero, a third compressible text-ish
            third = n // 3
            pages[:third] = rng.integers(0, 256, size=(third, 4096), dtype=np.uint8)
            pages[2 * third :] = (np.arange(4096, dtype=np.uint8) % 37 + 65)[None, :]
            self.state = json.dumps({"seed": config.seed}).encode()

    def write(self, pages: np.ndarray, value: int) -> None:
        self.blocks[0].pages[pages, :8] = value
        self._dirty[pages] = True

    def start(self) -> None:
        self._running = True

    def pause(self) -> None:
        self._running = False

    def resume(self) -> None:
        self._running = True
        self.resumed += 1

    @property
    def running(self) -> bool:
        return self._running

    def start_dirty_log(self) -> None:
        self._dirty[:] = False

    def sync_dirty_log(self) -> dict[str, np.ndarray]:
        idx = np.flatnonzero(self._dirty).astype(np.int64)
        self._dirty[:] = False
        return {"pc.ram": idx}

    def stop_dirty_log(self) -> None:
        pass

    def save_state(self) -> bytes:
        return self.state

    def load_state(self, blob: bytes) -> None:
        self.state = blob

    def close(self) -> None:
        for b in self.blocks:
            b.close()
