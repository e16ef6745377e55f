"""Live migrations between two processes (``livemig migrate --local``) of a dirtying portable
guest: every method with 1 and 8 channels, RAM identical at switchover, the counter continuing on
the destination; and a destination killed mid-migration leaves the source guest running."""

from __future__ import annotations

from pathlib import Path

import pytest

from livemig.guest import GuestConfig
from support.migrate import cli, killed_destination_leaves_source_running, migrate_local

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("channels", [1, 8])
@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_counter_guest_migrates_between_processes(tmp_path: Path, method: str, channels: int) -> None:
    res, _ = migrate_local(tmp_path, 32 << 20, "--guest", "portable", "--dirty-rate", "5000",
                           "--multifd-channels", str(channels), "--multifd-compression", method)
    assert res["livemig"]["method"] == method and res["livemig"]["channels"] == channels
    ram = res["ram"]
    assert ram["normal"] + ram["duplicate"] >= (32 << 20) // 4096
    assert ram["dirty-sync-count"] >= 2
    if method != "none":
        assert res["livemig"]["compression-ratio"] > 2.0


def test_killed_destination_leaves_source_guest_running(tmp_path: Path) -> None:
    killed_destination_leaves_source_running(
        tmp_path, GuestConfig(kind="portable", memory=64 << 20, workload="counter", fill="corpus"))


def test_bad_parameter_refused_before_anything_starts() -> None:
    r = cli("migrate", "--local", "--multifd-channels", "0", "--memory", "16M")
    assert r.returncode != 0
    assert "--multifd-channels 0: expected a value between 1 and 255" in r.stderr
