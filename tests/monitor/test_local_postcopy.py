"""Two ``livemig vm`` processes driven over QMP by ``migrate --local``'s driver
(:class:`livemig.migration.local.LocalMigration`) with capability ``postcopy-ram``: the driver sends
``migrate-start-postcopy`` after precopy pass N (MIGRATION_PASS), the guest counts on exactly on the
destination, and the source's query-migrate carries the post-copy figures."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from livemig.guest import GuestConfig, uffd
from livemig.migration.local import LocalMigration, plan
from livemig.params import MigrationParameters

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(uffd.unavailable() is not None, reason=f"userfaultfd: {uffd.unavailable()}")]


@pytest.mark.parametrize("after", [1, 2])
def test_local_pair_switches_after_pass_n(tmp_path: Path, after: int) -> None:
    cfg = GuestConfig(kind="portable", memory=32 << 20, fill="random", workload="counter", dirty_rate=20000,
                      working_set=2048)
    params = MigrationParameters(multifd_channels=2, max_bandwidth=16 << 20)
    pair = LocalMigration(cfg, ["--timeout", "20"], str(tmp_path))
    try:
        p = plan(params, None, 0.5, postcopy_ram=True, postcopy_after_passes=after)
        assert "postcopy-ram" in p.capabilities and p.postcopy_after_passes == after
        uri = pair.connect(p)
        info = pair.run(p, uri, threading.Event())
        assert info["status"] == "completed", info
        assert pair.peers is not None
        log = pair.peers.log
        assert "source: migrate-start-postcopy" in log
        assert info["livemig"]["passes"] == after  # the switch followed pass N
        assert info["ram"]["postcopy-bytes"] > 0 and info["livemig"]["postcopy"]["verified"] is True
        dinfo = pair.destination_info()
        assert dinfo["status"] == "completed"
        work = pair.workload(0.5)
        assert work.get("workload_check") == "ok", work
    finally:
        pair.close()
