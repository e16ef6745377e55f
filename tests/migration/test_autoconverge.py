"""auto-converge: QEMU's rule for when and how far to throttle (AutoConverge, pure), its parameters'
checks in QEMU's words (MigrationParameters, the command line, QMP), and migrations of counter guests
(portable and KVM) that only converge because the vCPUs are throttled, the guest continuing exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from livemig.errors import ParameterError
from livemig.guest import GuestConfig, create_guest
from livemig.migration.convergence import AutoConverge
from livemig.migration.stats import MigrationStats
from livemig.monitor import CommandTable, Session, version_info
from livemig.monitor.hmp import HMP, format_info_migrate
from livemig.params import MigrationParameters
from livemig.ui.progress import RateWindow
from livemig.vm import commands
from livemig.vm.machine import VM
from support.migrate import cli, migrate_local

PAGE = 4096


def _period(ac: AutoConverge, t: float, dirty_pages: int, sent: int, current: int) -> int | None:
    """One sync 1.5 s after ``t`` that found ``dirty_pages`` after ``sent`` more bytes went out."""
    return ac.on_sync(t + 1.5, dirty_pages, PAGE, ac.period_bytes_start + sent, current)


def test_throttle_starts_after_two_high_periods_then_rises_by_the_increment_to_the_max() -> None:
    ac = AutoConverge(initial=20, increment=10, maximum=45, threshold=50)
    ac.begin(0.0, 0)
    seen: list[int | None] = []
    pct, t = 0, 0.0
    for _ in range(8):
        new = _period(ac, t, dirty_pages=1000, sent=1000 * PAGE, current=pct)  # dirtied 100 % of what was sent
        t += 1.5
        seen.append(new)
        pct = new if new is not None else pct
    assert seen == [None, 20, None, 30, None, 40, None, 45]


def test_a_period_under_the_threshold_does_not_count_nor_reset() -> None:
    ac = AutoConverge(threshold=50)
    ac.begin(0.0, 0)
    assert _period(ac, 0.0, 600, 1000 * PAGE, 0) is None   # 60 % > 50 %: one
    assert _period(ac, 1.5, 500, 1000 * PAGE, 0) is None   # exactly 50 %: not over
    assert _period(ac, 3.0, 100, 1000 * PAGE, 0) is None
    assert _period(ac, 4.5, 900, 1000 * PAGE, 0) == 20     # the second high period, not in a row


def test_syncs_less_than_a_second_apart_add_up_to_one_period() -> None:
    ac = AutoConverge(threshold=50)
    ac.begin(0.0, 0)
    # ten syncs 0.1 s apart, 100 pages each, 1000 pages sent in all: one period, dirtied 100 %
    for i in range(1, 10):
        assert ac.on_sync(i * 0.1, 100, PAGE, i * 100 * PAGE, 0) is None
    assert ac.period_dirty_pages == 900
    assert ac.on_sync(1.01, 100, PAGE, 1000 * PAGE, 0) is None
    assert (ac.high_count, ac.period_dirty_pages) == (1, 0)


def test_tailslow_adds_only_what_brings_the_dirty_bytes_to_the_threshold() -> None:
    ac = AutoConverge(increment=30, tailslow=True, threshold=50)
    # throttle 40 %: the guest has 60 % of its CPU; it dirtied 60 % of what was sent (threshold 50 %):
    # the ideal is 60 * 50/60 = 50 % of CPU, so +10, not +30
    assert ac.throttle_down(40, dirty_bytes=600, threshold_bytes=500) == 50
    # far above the threshold: the increment bounds it
    assert ac.throttle_down(40, dirty_bytes=6000, threshold_bytes=500) == 70
    assert AutoConverge(increment=30, threshold=50).throttle_down(40, 600, 500) == 70


@given(current=st.integers(1, 99), inc=st.integers(1, 99), maximum=st.integers(1, 99),
       dirty=st.integers(2, 1 << 40), tailslow=st.booleans())
def test_throttle_down_rises_by_at_most_the_increment_up_to_the_max(current: int, inc: int, maximum: int,
                                                                    dirty: int, tailslow: bool) -> None:
    assume(current <= maximum)
    ac = AutoConverge(increment=inc, tailslow=tailslow, maximum=maximum)
    new = ac.throttle_down(current, dirty, dirty // 3)  # called only when dirty > threshold
    assert current < new <= maximum or new == current == maximum
    assert new - current <= inc
    if not tailslow:
        assert new == min(current + inc, maximum)


def test_query_migrate_progress_and_table_show_the_throttle() -> None:
    stats = MigrationStats(status="active", ram_total=1 << 20, auto_converge=True, cpu_throttle_percentage=30,
                           cpu_throttle_peak=30, passes=3)
    info = stats.to_qapi()
    assert info["cpu-throttle-percentage"] == 30
    assert "cpu throttle percentage: 30\n" in format_info_migrate(info)
    assert "throttle 30%" in RateWindow().snapshot(stats).text()
    stats.status, stats.cpu_throttle_percentage, stats.cpu_throttle_held_s = "completed", 0, 2.5
    done = stats.to_qapi()
    assert "cpu-throttle-percentage" not in done  # QEMU: only while the throttle is on
    assert done["livemig"]["auto-converge"] == {"cpu-throttle-peak": 30, "cpu-throttle-held-s": 2.5}
    assert "auto-converge: cpu throttle reached 30 %, held each vCPU 2.5 s" in stats.table()
    assert "throttle" not in RateWindow().snapshot(stats).text()
    assert "auto-converge" not in MigrationStats(status="completed").to_qapi()["livemig"]


# --- the parameters -----------------------------------------------------------------------------
RANGES = [("cpu-throttle-initial", 1, 99, 20), ("cpu-throttle-increment", 1, 99, 10),
          ("max-cpu-throttle", 1, 99, 99), ("throttle-trigger-threshold", 1, 100, 50)]


@pytest.mark.parametrize(("name", "lo", "hi", "default"), RANGES, ids=[r[0] for r in RANGES])
def test_parameters_have_qemus_defaults_and_range_checks(name: str, lo: int, hi: int, default: int) -> None:
    p = MigrationParameters()
    assert p.to_qapi()[name] == default and p.to_qapi()["cpu-throttle-tailslow"] is False
    for ok in (lo, hi):
        p.set(name, ok)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ParameterError) as exc:
            p.set(name, bad)
        assert str(exc.value) == (f"Parameter '{name.replace('-', '_')}' expects an integer in the range of "
                                  f"{lo} to {hi}")
    assert p.to_qapi()[name] == hi  # a refused set changes nothing


def test_tailslow_set_as_hmp_does() -> None:
    p = MigrationParameters()
    p.set("cpu-throttle-tailslow", "on")
    assert p.cpu_throttle_tailslow is True
    with pytest.raises(ParameterError, match="expects 'on' or 'off'"):
        p.set("cpu-throttle-tailslow", "maybe")


@pytest.mark.parametrize(("option", "value", "lo", "hi"), [("--cpu-throttle-initial", "0", 1, 99),
                                                           ("--max-cpu-throttle", "100", 1, 99),
                                                           ("--throttle-trigger-threshold", "101", 1, 100)])
def test_command_line_refuses_out_of_range_in_qemus_words(option: str, value: str, lo: int, hi: int) -> None:
    r = cli("migrate", "--local", "--guest", "portable", "--memory", "8M", "--auto-converge", option, value)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{option} {value}: expected an integer in the range of {lo} to {hi}" in r.stderr
    assert r.stderr.count("expected") == 1


def test_bench_options_are_checked_before_anything_runs() -> None:
    r = cli("bench", "--workload", "dirty", "--dirty-rate", "-5", "--auto-converge")
    assert r.returncode == 2 and "--dirty-rate -5: expected pages per second 0 or more" in r.stderr, r.stderr
    r = cli("bench", "--working-set", "x")
    assert r.returncode == 2 and "--working-set" in r.stderr


def _qmp(vm: VM) -> tuple[Session, CommandTable]:
    table = CommandTable()
    commands.register(table, vm)
    session = Session(table, version_info())
    assert session.handle({"execute": "qmp_capabilities"}) == {"return": {}}
    return session, table


def test_qmp_capability_and_parameters() -> None:
    vm = VM(create_guest(GuestConfig(kind="portable", memory=8 << 20)), timeout=5)
    try:
        s, table = _qmp(vm)

        def run(name: str, **args: Any) -> dict[str, Any]:
            out: dict[str, Any] = s.handle({"execute": name, "arguments": args})
            return out

        caps = {c["capability"]: c["state"] for c in run("query-migrate-capabilities")["return"]}
        assert caps["auto-converge"] is False
        run("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True}])
        assert {"capability": "auto-converge", "state": True} in run("query-migrate-capabilities")["return"]
        assert run("migrate-set-parameters", **{"cpu-throttle-initial": 30, "cpu-throttle-tailslow": True}) == \
            {"return": {}}
        got = run("query-migrate-parameters")["return"]
        assert (got["cpu-throttle-initial"], got["cpu-throttle-tailslow"]) == (30, True)
        for args, desc in [
            ({"cpu-throttle-initial": 100}, "Parameter 'cpu_throttle_initial' expects an integer in the range of "
                                            "1 to 99"),
            ({"cpu-throttle-increment": 0}, "Parameter 'cpu_throttle_increment' expects an integer in the range "
                                            "of 1 to 99"),
            ({"throttle-trigger-threshold": 101}, "Parameter 'throttle_trigger_threshold' expects an integer in "
                                                  "the range of 1 to 100"),
            ({"max-cpu-throttle": 300}, "Parameter 'max-cpu-throttle' expects uint8_t"),
            ({"cpu-throttle-tailslow": 1}, "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
        ]:
            assert run("migrate-set-parameters", **args)["error"] == {"class": "GenericError", "desc": desc}
        assert run("query-migrate-parameters")["return"] == got
        hmp = HMP(table)
        assert "\ncpu-throttle-tailslow: on\n" in hmp.run("info migrate_parameters").output
        hmp.run("migrate_set_parameter cpu-throttle-tailslow off")
        hmp.run("migrate_set_parameter max-cpu-throttle 70")
        out = hmp.run("info migrate_parameters").output
        assert "\ncpu-throttle-tailslow: off\n" in out and "\nmax-cpu-throttle: 70\n" in out
        assert "auto-converge: on" in hmp.run("info migrate_capabilities").output
    finally:
        vm.guest.close()


# --- migrations that need it ----------------------------------------------------------------------
#: 16 MiB guest, counter over 2000 pages at 20,000 steps/s, 40 Mbit/s (~1,200 pages/s): every pass
#: finds the whole working set dirty again until the throttle reaches 99 %
BUSY = ("--memory", "16M", "--dirty-rate", "20000", "--working-set", "2000", "--multifd-channels", "2",
        "--max-bandwidth", "40Mbps", "--max-passes", "0", "--downtime-limit", "1000", "--auto-converge",
        "--cpu-throttle-initial", "90", "--cpu-throttle-increment", "9")


def _converged(res: dict[str, Any]) -> None:
    ac = res["livemig"]["auto-converge"]
    assert ac["cpu-throttle-peak"] == 99, ac
    assert ac["cpu-throttle-held-s"] > 0.5, ac  # the vCPU really was held back
    assert "cpu-throttle-percentage" not in res  # off again once completed, as QEMU reports it
    assert res["downtime"] < 1000 + 500  # the limit, plus the destination's answer on a loaded host


@pytest.mark.slow
def test_portable_counter_guest_converges_only_throttled(tmp_path: Path) -> None:
    res, _src = migrate_local(tmp_path, 16 << 20, "--guest", "portable", *BUSY)
    _converged(res)


@pytest.mark.slow
@pytest.mark.kvm
def test_kvm_counter_guest_converges_only_throttled(tmp_path: Path) -> None:
    res, _src = migrate_local(tmp_path, 16 << 20, "--guest", "kvm", *BUSY)
    _converged(res)
