"""The bench's pure parts: aggregation (medians/min/max), the document's table, markdown, JSON, limits.

Every figure in a table must come from a run: the tests feed different fake results through the
same functions and check that the printed numbers follow them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from livemig.bench.limits import CodecSpeed, LoopbackSpeed, compute_limit
from livemig.bench.model import Run, Stat, aggregate
from livemig.bench.render import render_bench, render_markdown, render_memory, render_text
from support.benchrows import bench_of, data_cells, result, run


@pytest.mark.parametrize(
    "a,b",
    [
        (dict(total=16630, down=28, mbps=10467, pps=2940235, send=160, recv=360),
         dict(total=20165, down=24, mbps=8579, pps=2391465, send=810, recv=340)),
        (dict(total=111, down=2, mbps=33, pps=44, send=55, recv=66),
         dict(total=999, down=8, mbps=77, pps=88, send=11, recv=22)),
    ],
)  # fmt: skip
def test_table_figures_follow_the_results(a: dict[str, float], b: dict[str, float]) -> None:
    rows = aggregate([run("zstd", result(**a)), run("none", result(**b))])
    text = render_text(rows, cores=2, channels_label="8 Channels")
    for label, src in (("zstd", a), ("none", b)):
        cells = data_cells(text, label)
        assert cells[:6] == [f"{src[k]:.0f}" for k in ("total", "down", "mbps", "pps", "send", "recv")]


def test_document_layout() -> None:
    rows = aggregate([run("qatzip", result(16630)), run("zstd", result(20165)), run("none", result(46063))])
    text = render_text(rows, cores=2, channels_label="8 Channels")
    lines = text.splitlines()
    assert lines[0].startswith("|---") and lines[3] == lines[0]
    head = [c.strip() for c in lines[1].strip("|").split("|")]
    sub = [c.strip() for c in lines[2].strip("|").split("|")]
    assert head[:7] == ["8 Channels", "Total", "down", "throughput", "pages per", "send", "recv"]
    assert sub[1:7] == ["time(ms)", "time(ms)", "(mbps)", "second", "cpu %", "cpu%"]
    assert head[7:] == ["2-core", "% of", "sent", "pages"] and sub[7:] == ["limit(ms)", "limit", "(MiB)", "/RAM"]
    # a rule after every row, all lines the same width
    assert [ln for ln in lines[4:] if not ln.startswith("|---")][0].startswith("|qatzip")
    assert len({len(ln) for ln in lines}) == 1
    assert lines[-1] == lines[0]


def test_median_min_max() -> None:
    runs = [run("zstd", result(t, down=d), rep=i) for i, (t, d) in enumerate([(300, 9), (100, 7), (200, 30)])]
    (row,) = aggregate(runs)
    assert row.stats["total-time"] == Stat(200.0, 100.0, 300.0, 3)
    assert row.stats["downtime"] == Stat(9.0, 7.0, 30.0, 3)
    text = render_text([row], 2, "8 Channels")
    assert data_cells(text, "zstd")[:2] == ["200", "9"]
    spread = render_text([row], 2, "8 Channels", spread=True)
    assert data_cells(spread, "zstd")[:2] == ["100..300", "7..30"]


def test_failed_repeat_is_excluded_and_reported() -> None:
    runs = [run("zstd", result(100)), run("zstd", None, rep=1, error="exit status 1: boom")]
    runs.append(run("zstd", result(300), rep=2))
    (row,) = aggregate(runs)
    assert row.stats["total-time"] == Stat(200.0, 100.0, 300.0, 2)
    assert row.errors == ["run 2: exit status 1: boom"]
    assert row.note is None


def test_na_and_error_rows_do_not_stop_others() -> None:
    runs = [
        run("qatzip", None, na="no QAT device; install libqatzip3"),
        run("zstd", None, error="status failed: channel 3 closed"),
        run("none", result(4321)),
    ]
    rows = aggregate(runs)
    text = render_text(rows, 2, "8 Channels")
    assert re.search(r"^\|qatzip +\|n/a: no QAT device; install libqatzip3 *\|$", text, re.M)
    assert re.search(r"^\|zstd +\|error: status failed: channel 3 closed *\|$", text, re.M)
    assert data_cells(text, "none")[0] == "4321"
    md = render_markdown(rows, 2, "8 Channels")
    assert "| qatzip | n/a: no QAT device; install libqatzip3 |" in md
    assert [ln.count("|") for ln in md.splitlines()] == [12] * 5


def test_markdown_shape_and_values() -> None:
    rows = aggregate([run("zstd", result(1234, pps=5678))])
    md = render_markdown(rows, 2, "8 Channels").splitlines()
    assert md[0].startswith("| 8 Channels | Total time(ms) | down time(ms) | throughput (mbps) | pages per second")
    assert md[1] == "|---|" + "|".join(["---:"] * 10) + "|"
    cells = [c.strip() for c in md[2].strip("|").split("|")]
    assert cells[0] == "zstd" and cells[1] == "1234" and cells[4] == "5678"


def test_limit_formula_and_column() -> None:
    codec = CodecSpeed("zstd", 1, 100, 25, compress_bps=500e6, decompress_bps=1000e6)  # ratio 4
    loop = LoopbackSpeed(1 << 28, 3e9, core_seconds_per_byte=0.5e-9)
    ram = 1_000_000_000
    lim = compute_limit(ram, codec, loop, cap=0, cores=2)
    assert lim.wire_bytes == pytest.approx(250e6)
    assert lim.compute_s == pytest.approx((2.0 + 1.0 + 250e6 * 0.5e-9) / 2)
    assert lim.ms == pytest.approx(1000 * lim.compute_s)
    slow_link = compute_limit(ram, codec, loop, cap=100_000_000, cores=2)
    assert slow_link.ms == pytest.approx(2500.0)  # 250 MB at 100 MB/s
    none = CodecSpeed("none", 1, 100, 100, float("inf"), float("inf"))
    assert compute_limit(ram, none, loop, cap=0, cores=2).compute_s == pytest.approx(ram * 0.5e-9 / 2)
    (row,) = aggregate([run("zstd", result(3125))])
    row.limit_ms = lim.ms
    cells = data_cells(render_text([row], 2, "8 Channels"), "zstd")
    assert cells[6] == f"{lim.ms:.0f}" and cells[7] == f"{100 * lim.ms / 3125:.0f}%"


def test_sent_column_prefers_socket_bytes() -> None:
    r1 = run("zstd", result(10, wire=100 << 20))
    r2 = run("none", result(10, wire=100 << 20), extra={"socket-bytes": 50 << 20})
    text = render_text(aggregate([r1, r2]), 2, "8 Channels")
    assert data_cells(text, "zstd")[8] == "100.0"
    assert data_cells(text, "none")[8] == "50.0"


def test_qemu_peer_rows_and_ratios() -> None:
    ours = run("zstd", result(1000, down=10, send=200), extra={"socket-bytes": 300})
    theirs = Run("qemu", "zstd", 8, 1_250_000_000, 0, result(4000, down=40, send=100), extra={"socket-bytes": 600})
    na = Run("qemu", "qatzip", 8, 1_250_000_000, 0, na="QEMU 7.2 has no qatzip (since 9.2)")
    text = render_text(aggregate([ours, theirs, run("qatzip", result(900)), na]), 2, "8 Channels")
    ratio = data_cells(text, "livemig/QEMU")
    assert ratio[0] == "0.25x" and ratio[1] == "0.25x" and ratio[4] == "2.00x" and ratio[8] == "0.50x"
    assert data_cells(text, "zstd QEMU")[0] == "4000"
    assert data_cells(text, "qatzip QEMU")[0] == "n/a: QEMU 7.2 has no qatzip (since 9.2)"


def test_memory_table_follows_results() -> None:
    runs = []
    for ch, (s, r) in {2: (10, 11), 4: (12, 14), 8: (16, 20)}.items():
        runs.append(run("zstd", result(1, smem=s << 20, rmem=r << 20), channels=ch))
        runs.append(run("none", result(1, smem=(s + 1) << 20, rmem=(r + 2) << 20), channels=ch))
    runs.append(run("qatzip", None, channels=2, na="no device"))
    text = render_memory(aggregate(runs))
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|-")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["Number of channels", "zstd sender", "zstd receiver", "none sender", "none receiver",
                    "qatzip sender", "qatzip receiver"]  # fmt: skip
    body = {ln.strip("|").split("|")[0].strip(): [c.strip() for c in ln.strip("|").split("|")[1:]] for ln in lines[1:]}
    assert body["2"] == ["10.0M", "11.0M", "11.0M", "13.0M", "n/a", "n/a"]
    assert body["8"][:4] == ["16.0M", "20.0M", "17.0M", "22.0M"]
    assert "qatzip at 2 channels: n/a: no device" in text


def test_full_output_and_json_shape() -> None:
    b = bench_of([
        run("qatzip", None, na="no QAT"),
        run("zstd", result(2500, backend="cpu: zstd 1.5.4")),
        run("none", result(1700, backend="cpu")),
    ])  # fmt: skip
    text = render_bench(b, markdown=False)
    assert "Host: 2 cores, Test CPU" in text
    assert "zstd-1 ratio 3.24" in text
    assert "qatzip: n/a (no QAT); zstd: CPU (cpu: zstd 1.5.4); none: CPU (cpu)" in text
    assert data_cells(text, "zstd")[0] == "2500"
    doc = json.loads(json.dumps(b.to_json(), default=str))
    assert set(doc) >= {"host", "config", "data", "codecs", "loopback", "rows", "runs", "memory-rows"}
    assert doc["config"]["methods"] == ["qatzip", "zstd", "none"] and doc["config"]["unavailable"]["qatzip"] == "no QAT"
    assert doc["data"] == {"sample-bytes": 32 << 20, "zero-fraction": 0.02, "zstd-1-ratio": 3.24}
    assert [r["method"] for r in doc["runs"]] == ["qatzip", "zstd", "none"]
    assert doc["runs"][1]["result"]["total-time"] == 2500
    zrow = doc["rows"][1]
    assert zrow["stats"]["total-time"]["median"] == 2500 and zrow["limit-ms"] > 0
    assert doc["rows"][0]["note"] == "n/a: no QAT"


def test_accelerator_is_named_from_the_result() -> None:
    b = bench_of([run("qatzip", result(900, backend="hardware: QAT 4xxx", accelerated=True))])
    assert "qatzip: accelerator (hardware: QAT 4xxx)" in render_bench(b, markdown=True)


def test_plots_are_written(tmp_path: Any) -> None:
    from livemig.bench.plots import write_plots

    runs = []
    for bw, f in ((125_000_000, 1), (1_250_000_000, 5), (0, 8)):
        runs += [run("zstd", result(1000 * f, pps=40000 * f), bw=bw), run("none", result(900, pps=30000 * f), bw=bw)]
    runs.append(run("qatzip", None, na="no QAT"))
    b = bench_of(runs, bandwidths=(125_000_000, 1_250_000_000, 0))
    paths = write_plots(b, str(tmp_path / "plots"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["time-cpu.png", "pps-vs-bandwidth.png", "wire-bytes.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_bandwidth_draws_bars_not_a_sweep(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from livemig.bench import plots

    drawn: list[list[str]] = []
    real = plots._pps_bars
    monkeypatch.setattr(plots, "_pps_sweep", lambda *a: pytest.fail("a sweep plot for one bandwidth"))
    monkeypatch.setattr(
        plots, "_pps_bars", lambda b, rows, d: drawn.append([r.method for r in rows]) or real(b, rows, d)
    )
    b = bench_of([run("zstd", result(1000)), run("none", result(900)), run("qatzip", None, na="no QAT")])
    paths = plots.write_plots(b, str(tmp_path))
    assert drawn == [["zstd", "none"]] and len(paths) == 3


def test_pages_sent_per_ram_page_follows_results() -> None:
    once, twice = result(10), result(10)
    twice["ram"] = dict(twice["ram"], normal=500000, duplicate=24288)  # 2 x 262144 pages of 1 GiB
    text = render_text(aggregate([run("zstd", once), run("none", twice)]), 2, "8 Channels")
    assert data_cells(text, "zstd")[9] == f"{(250000 + 12000) * 4096 / (1 << 30):.2f}x"
    assert data_cells(text, "none")[9] == "2.00x"


def test_a_sweep_plots_every_bandwidth_with_labelled_limits(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.colors

    from livemig.bench import plots

    figs: dict[str, Any] = {}
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, d, name: figs.setdefault(name, fig) and real_save(fig, d, name))
    runs = []
    for bw in (125_000_000, 0):
        runs += [run("zstd", result(1000, pps=40000), bw=bw), run("none", result(900, pps=30000), bw=bw)]
    b = bench_of(runs, bandwidths=(125_000_000, 0))
    plots.write_plots(b, str(tmp_path / "plots"))
    titles = [ax.get_title() for ax in figs["time-cpu.png"].axes]
    assert titles == ["Total time, 1Gbps", "CPU per side, 1Gbps", "Total time, uncapped", "CPU per side, uncapped"]
    red = matplotlib.colors.to_rgba("tab:red")
    limit_labels = [t.get_text() for ax in figs["time-cpu.png"].axes[::2] for t in ax.texts
                    if matplotlib.colors.to_rgba(t.get_color()) == red]
    rows = b.rows()
    assert limit_labels == [f"{r.limit_ms:,.0f} ms" for r in rows if r.limit_ms is not None and not r.note]
    wire = figs["wire-bytes.png"].axes[0]
    assert len(wire.patches) == 4  # 2 methods x 2 bandwidths
    legend = [t.get_text() for t in wire.get_legend().get_texts()]
    assert legend == ["guest RAM (1,024 MiB)", "max-bandwidth 1Gbps", "max-bandwidth uncapped"]
    assert not [t for t in wire.texts if "guest RAM" in t.get_text()]  # in the legend, not on the line
