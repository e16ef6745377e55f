"""The statistics' renderings: the table's words and the active-phase rate, on a fake clock."""

from __future__ import annotations

import pytest

from livemig.migration import stats as stats_mod
from livemig.migration.stats import ChannelCounters, MigrationStats


def _completed(method: str, level: int | None, channels: int) -> MigrationStats:
    s = MigrationStats(status="completed", method=method, level=level, ram_total=1 << 20, total_time_ms=10)
    s.channels = [ChannelCounters(normal=1) for _ in range(channels)]
    return s


@pytest.mark.parametrize(("method", "level", "channels", "line"), [
    ("none", None, 1, "method: none on 1 channel: "),
    ("zstd", 1, 4, "method: zstd (level 1) on 4 channels: "),
    ("zlib", 0, 2, "method: zlib (level 0) on 2 channels: "),
])
def test_table_names_the_method_its_level_and_channels(method: str, level: int | None, channels: int,
                                                        line: str) -> None:
    assert line in _completed(method, level, channels).table()


def test_mbps_is_the_active_phase_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(stats_mod.time, "monotonic", lambda: now[0])
    s = MigrationStats(status="active", ram_total=1 << 20)
    ch = ChannelCounters(wire_bytes=500_000)  # setup: handshakes and the first SYNC round
    s.channels = [ch]
    s.begin_active()
    now[0] += 2.0
    ch.wire_bytes += 250_000
    ch.normal = 10
    assert s.mbps() == pytest.approx(250_000 * 8 / 2.0 / 1e6)  # live: since active began
    s.end_active()
    ch.wire_bytes += 10_000_000  # the uncapped switchover
    now[0] += 1.0
    assert s.active_bytes() == 250_000 and s.active_seconds() == 2.0
    assert s.mbps() == pytest.approx(1.0)


def test_nothing_moved_means_no_rate() -> None:
    s = MigrationStats(status="failed", ram_total=1 << 20, remaining=1 << 20, total_time_ms=5)
    s.channels = [ChannelCounters(wire_bytes=64)]
    assert s.mbps() == 0
    assert s.to_qapi()["ram"]["remaining"] == 1 << 20
