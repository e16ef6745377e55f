"""``livemig bench --auto-converge --postcopy-ram``: plain precopy, auto-converge and post-copy rows
of one method side by side, their convergence table (figures from the runs' results), a run still in
precopy at ``--timeout`` reported as not converging, and the driver's post-copy switch."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from livemig.bench.config import parse_convergence, parse_options
from livemig.bench.convergence import render_convergence
from livemig.bench.drive import PostcopySwitch
from livemig.bench.model import aggregate, label_parts, not_finished, row_label
from livemig.bench.render import render_bench
from livemig.bench.runner import Experiment, migrate_argv
from livemig.errors import ParameterError
from support.benchrows import bench_args, bench_of, data_cells, result, run


def test_rows_from_flags_or_list() -> None:
    assert parse_convergence(None, False, False) == ("precopy",)
    assert parse_convergence(None, True, True) == ("precopy", "auto-converge", "postcopy")
    assert parse_convergence(None, False, True) == ("precopy", "postcopy")
    assert parse_convergence("postcopy,precopy", False, False) == ("precopy", "postcopy")
    with pytest.raises(ParameterError, match="--convergence: unknown 'throttle' \\(accepted: precopy, auto-"):
        parse_convergence("throttle", False, False)
    with pytest.raises(ParameterError, match="leave out --auto-converge"):
        parse_convergence("precopy", True, False)


def test_options_make_three_rows_per_method() -> None:
    c = parse_options(bench_args(methods="none", memory="64M", guest="portable", workload="dirty",
                                 dirty_rate=100000, working_set=4096, auto_converge=True, postcopy_ram=True,
                                 postcopy_after_passes=2))
    assert c.convergence == ("precopy", "auto-converge", "postcopy") and c.postcopy_after_passes == 2
    assert c.workload_args() == ("--dirty-rate", "100000", "--working-set", "4096")  # no --auto-converge: per row
    with pytest.raises(ParameterError, match="--postcopy-after-passes 0"):
        parse_options(bench_args(methods="none", memory="64M", guest="portable", postcopy_after_passes=0))


def test_labels_and_migrate_argv_per_row() -> None:
    assert row_label("zstd", "postcopy", tls=True) == "zstd+postcopy+tls"
    assert label_parts("zstd+postcopy+tls") == ("zstd", "postcopy")
    assert label_parts("zstd+auto-converge") == ("zstd", "auto-converge") and label_parts("none") == ("none", "precopy")
    exp = Experiment("portable", 64 << 20, "dirty", "random", postcopy_after_passes=3)
    plain = migrate_argv(exp, "zstd", 8, 0, "/x.json")
    assert "--auto-converge" not in plain and "--postcopy-ram" not in plain
    pc = migrate_argv(dataclasses.replace(exp, convergence="postcopy"), "zstd", 8, 0, "/x.json")
    assert pc[-3:] == ["--postcopy-ram", "--postcopy-after-passes", "3"]
    ac = migrate_argv(dataclasses.replace(exp, convergence="auto-converge"), "zstd", 8, 0, "/x.json")
    assert ac[-1] == "--auto-converge"


def _postcopy(total: float, down: float, t_ms: int, req: int, p50: int, p99: int) -> dict[str, Any]:
    r = result(total, down)
    r["livemig"]["postcopy"] = {"time-ms": t_ms, "pages-requested": req, "faults": req + 1,
                                "fault-latency-us": {"p50": p50, "p99": p99}, "verified": True}
    r["ram"]["postcopy-requests"] = req
    return r


@pytest.mark.parametrize("pc,ac", [((7100, 21, 5400, 812, 240, 1900), (33000, 120, 60)),
                                   ((9000, 9, 3000, 17, 90, 700), (41000, 250, 99))])
def test_convergence_table_figures_follow_the_results(pc: tuple[int, ...], ac: tuple[int, int, int]) -> None:
    throttled = result(ac[0], ac[1])
    throttled["livemig"]["auto-converge"] = {"cpu-throttle-peak": ac[2], "cpu-throttle-held-s": 1.0}
    runs = [run("zstd", None, error=not_finished(60, {"status": "cancelled",
                                                       "ram": {"dirty-sync-count": 14, "dirty-pages-rate": 98000}})),
            run("zstd+auto-converge", throttled), run("zstd+postcopy", _postcopy(*pc))]
    text = render_convergence(aggregate(runs))
    stuck = "did not converge in 60 s (14 passes, guest dirtying 98000 pages/s)"
    assert data_cells(text, "zstd") == [stuck] + ["-"] * 7
    assert data_cells(text, "zstd+auto-converge") == ["completed", str(ac[0]), str(ac[1]), str(ac[2]), "-", "-",
                                                      "-", "-"]
    assert data_cells(text, "zstd+postcopy") == ["completed", str(pc[0]), str(pc[1]), "-", *map(str, pc[2:])]
    md = render_convergence(aggregate(runs), markdown=True)
    assert md.splitlines()[0].startswith("| row | outcome | total time(ms) |")


def test_bench_shows_the_convergence_table_only_with_such_rows() -> None:
    b = bench_of([run("zstd", result(1000)), run("zstd+postcopy", _postcopy(2000, 10, 900, 5, 80, 300))])
    assert "how each row finished" not in render_bench(b, False)
    b.config = dataclasses.replace(b.config, convergence=("precopy", "postcopy"))
    b.runs[0] = run("zstd", None, error=not_finished(60, {"status": "active", "ram": {"dirty-sync-count": 9}}))
    text = render_bench(b, False)
    assert "how each row finished:" in text and "|zstd+postcopy|completed|" in text.replace(" ", "")
    assert "zstd: CPU (cpu: zstd 1.5.5)" in text  # the method ran, in its post-copy row


def test_not_finished_wording() -> None:
    busy = {"status": "active", "ram": {"dirty-sync-count": 3}}
    assert not_finished(60, busy) == "did not converge in 60 s (3 passes)"
    assert not_finished(60, None) == "timed out after 60 s"
    assert not_finished(60, {"status": "postcopy-active", "ram": {"dirty-sync-count": 2}}) == \
        "timed out after 60 s (status postcopy-active)"


class _Src:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.sent.append(command)
        return {}


def test_postcopy_switch_once_at_its_pass() -> None:
    src = _Src()
    switch = PostcopySwitch(src, 2)  # type: ignore[arg-type]
    switch.seen("MIGRATION_PASS", {"pass": 1})
    switch.seen("query-migrate", {"status": "active", "ram": {"dirty-sync-count": 1}})
    assert src.sent == []
    switch.seen("MIGRATION_PASS", {"pass": 2})
    switch.seen("MIGRATION_PASS", {"pass": 3})
    assert src.sent == ["migrate-start-postcopy"] and switch.sent_in == 2
    late = _Src()
    missed = PostcopySwitch(late, 1)  # type: ignore[arg-type]
    missed.seen("MIGRATION", {"status": "active"})
    missed.seen("query-migrate", {"status": "setup", "ram": {"dirty-sync-count": 1}})
    assert late.sent == []
    missed.seen("query-migrate", {"status": "active", "ram": {"dirty-sync-count": 4}})  # the event was missed
    assert late.sent == ["migrate-start-postcopy"] and missed.sent_in == 4


def test_long_errors_are_shortened_in_the_outcome_column() -> None:
    long = "status failed: " + "x" * 200
    text = render_convergence(aggregate([run("zstd+postcopy", None, error=long)]))
    cell = data_cells(text, "zstd+postcopy")[0]
    assert cell == ("error: " + long)[:69] + "..." and len(cell) == 72
