"""The data path's own accounting: each chunk hashed about once on the receiver, pages byte-exact,
the destination caught up before the pause."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from livemig.guest.base import GuestConfig
from livemig.migration.stats import MigrationStats
from livemig.params import MigrationParameters
from livemig.ram.digest import CHUNK_PAGES
from support.fakeguest import FakeGuest
from support.migrate import in_process


def _run(params: MigrationParameters, memory: int) -> tuple[MigrationStats, dict[str, Any], FakeGuest, FakeGuest]:
    cfg = GuestConfig(memory=memory, seed=5)
    src, dstg = FakeGuest(cfg), FakeGuest(cfg, incoming=True)
    stats, out = in_process(src, dstg, params)
    return stats, out, src, dstg


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_receiver_hashes_each_chunk_about_once(method: str) -> None:
    memory = 16 << 20
    params = MigrationParameters(multifd_channels=4, multifd_compression=method, max_bandwidth=0)
    stats, res, sg, dg = _run(params, memory)
    assert stats.status == "completed", stats.error
    assert np.array_equal(sg.blocks[0].pages, dg.blocks[0].pages)
    # one pass of whole packets: every chunk hashed once as it landed, a chunk of zero pages not at all
    chunks = sg.blocks[0].pages.reshape(-1, CHUNK_PAGES * 4096)
    zero_chunks = int(np.count_nonzero(~chunks.any(axis=1)))
    assert zero_chunks  # the fake guest's RAM is one third zero
    assert res["recv-hashed-bytes"] == memory - zero_chunks * CHUNK_PAGES * 4096
