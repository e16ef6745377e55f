"""``auto``'s codec and socket speeds kept across processes (:mod:`livemig.accel.cache`): reused
while fresh and for the same host and libraries, measured again otherwise, never an error; the
choice says where its speeds came from."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from livemig.accel import cache
from livemig.accel.speed import Measurement
from livemig.compress import auto, create_method
from support.migrate import cli

SPEEDS = {("zstd", 1): Measurement("zstd", 1, "cpu: test", False, 3.0, 2e8, 1e9, 5e-9, 1e-9, 3e8, 1.5e9, 2),
          ("none", None): Measurement("none", None, "cpu: test", False, 1.0, 1e12, 1e12, 1e-12, 1e-12, 2e12, 2e12, 2)}


@pytest.fixture
def measuring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, int | None]]:
    """A cache in tmp_path, a fresh process state, and a measure() that records its calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LIVEMIG_SPEED_CACHE", raising=False)
    calls: list[tuple[str, int | None]] = []

    def measure(name: str, level: int | None, data: bytes, threads: int, repeat: int) -> Measurement:
        calls.append((name, level))  # a measurement names the backend it ran on
        return dataclasses.replace(SPEEDS[(name, level)], backend=create_method(name, level or 1).backend())

    monkeypatch.setattr("livemig.accel.speed.measure", measure)
    monkeypatch.setattr("livemig.accel.speed.measure_loopback",
                        lambda total, connections, tcp: type("L", (), {"all_bps": 3e9})())
    new_process(monkeypatch)
    return calls


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new process starts with: nothing measured yet."""
    for name in ("_speeds", "_loop", "_origin"):
        monkeypatch.setattr(auto, name, {})


CANDS = [("zstd", 1), ("none", None)]


def test_a_later_process_reuses_the_speeds(measuring: list[tuple[str, int | None]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first, loop = auto.host_speeds(CANDS, 2, b"")
    assert measuring == CANDS and auto.speed_origin(CANDS, 2) == "codec speeds measured now"
    new_process(monkeypatch)
    again, loop_again = auto.host_speeds(CANDS, 2, b"")
    assert measuring == CANDS  # nothing measured the second time
    assert again == first and loop_again == loop == 3e9
    assert auto.speed_origin(CANDS, 2).startswith("codec speeds cached 0 min ago (")
    saved = json.loads(cache.path().read_text())
    assert all(k.startswith(cache.host_key()) for k in saved) and len(saved) == 3  # two codecs, one socket rate
    new_process(monkeypatch)
    auto.host_speeds(CANDS, 1, b"")  # another thread count is another figure
    assert measuring == CANDS * 2


def test_old_entries_another_host_or_library_and_a_broken_file_are_measured_again(
        measuring: list[tuple[str, int | None]], monkeypatch: pytest.MonkeyPatch) -> None:
    auto.host_speeds(CANDS, 2, b"")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + cache.MAX_AGE + 60)
    new_process(monkeypatch)
    auto.host_speeds(CANDS, 2, b"")
    assert measuring == CANDS * 2
    monkeypatch.setattr(time, "time", real_time)
    cache.host_key.cache_clear()
    monkeypatch.setattr(cache, "_versions", lambda: "zstd 9.9.9")
    try:
        new_process(monkeypatch)
        auto.host_speeds(CANDS, 2, b"")
        assert measuring == CANDS * 3
    finally:
        cache.host_key.cache_clear()
    cache.path().write_text("{not json")
    new_process(monkeypatch)
    auto.host_speeds(CANDS, 2, b"")
    assert measuring == CANDS * 4 and json.loads(cache.path().read_text())  # rewritten whole


def test_off_neither_reads_nor_writes(measuring: list[tuple[str, int | None]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_SPEED_CACHE", "off")
    auto.host_speeds(CANDS, 2, b"")
    new_process(monkeypatch)
    auto.host_speeds(CANDS, 2, b"")
    assert measuring == CANDS * 2 and not cache.path().exists()


def test_an_unwritable_cache_is_not_an_error(measuring: list[tuple[str, int | None]], tmp_path: Path) -> None:
    (tmp_path / "livemig").write_text("a file where the directory should be")
    speeds, _ = auto.host_speeds(CANDS, 2, b"")
    assert speeds[("zstd", 1)].ratio == SPEEDS[("zstd", 1)].ratio


def test_the_second_auto_migration_says_its_speeds_were_cached(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """Two real processes: the first measures and says so, the second reads the file and says so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LIVEMIG_SPEED_CACHE", raising=False)
    reasons = []
    for k in range(2):
        out = tmp_path / f"r{k}.json"
        r = cli("migrate", "--local", "--guest", "portable", "--memory", "8M", "--multifd-compression", "auto",
                "--max-bandwidth", "1Gbps", "--quiet", "--json", str(out))
        assert r.returncode == 0, r.stderr
        reasons.append(json.loads(out.read_text())["livemig"]["auto"]["reason"])
    assert "codec speeds measured now" in reasons[0]
    assert f"codec speeds cached 0 min ago ({tmp_path}/livemig/speeds.json)" in reasons[1]
