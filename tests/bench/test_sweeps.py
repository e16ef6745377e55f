"""The bench's size sweep (``--memory 1G,4G,8G``), link rows (``--link-rate``: tc tbf in its
namespace), ``auto`` rows (labelled and limited by what they picked), and the all-cores limit."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from typing import Any

import pytest

from livemig.bench import cli as bench_cli
from livemig.bench.config import parse_options, sections
from livemig.bench.limits import CodecSpeed, LoopbackSpeed, compute_limit
from livemig.bench.model import Run
from livemig.bench.procs import Children, NetNamespace
from livemig.bench.render import render_bench, render_sweep
from support.benchrows import bench_args, bench_of, data_cells, result

GIB = 1 << 30


def test_limit_uses_speeds_measured_with_all_cores_busy() -> None:
    """Two threads at 1.55x one: the limit follows the measured aggregate, not 2x one thread."""
    codec = CodecSpeed("zstd", 1, 100, 25, 345e6, 1000e6, 534e6, 1700e6, 2)  # ratio 4
    loop = LoopbackSpeed(1 << 28, 3e9, 0.5e-9, all_bps=4e9, connections=2)
    lim = compute_limit(GIB, codec, loop, cap=0, cores=2, channels=8)
    assert lim.compute_s == pytest.approx(GIB / 534e6 + GIB / 1700e6 + GIB / 4 / 4e9)
    old = compute_limit(GIB, dataclasses.replace(codec, threads=1), LoopbackSpeed(1 << 28, 3e9, 0.5e-9), 0, 2)
    assert old.compute_s == pytest.approx((GIB / 345e6 + GIB / 1000e6 + GIB / 4 * 0.5e-9) / 2)  # one-thread model
    assert lim.ms > old.ms
    capped = compute_limit(GIB, codec, loop, cap=5 * 10**7, cores=2)
    assert capped.link_s == pytest.approx(GIB / 4 / 5e7) and capped.ms == pytest.approx(1000 * capped.link_s)


def test_memory_list_and_link_rates_make_sections() -> None:
    c = parse_options(bench_args(memory="64M,128M", link_rate="1Gbit,10Gbit", bandwidth="10Gbps,0",
                                 methods="none,auto"))
    assert c.memories == (64 << 20, 128 << 20) and c.link_rates == (125_000_000, 1_250_000_000)
    got = [(s.memory >> 20, s.link_rate, s.bandwidths) for s in sections(c)]
    assert got == [(64, 0, (1_250_000_000, 0)), (64, 125_000_000, (0,)), (64, 1_250_000_000, (0,)),
                   (128, 0, (1_250_000_000, 0)), (128, 125_000_000, (0,)), (128, 1_250_000_000, (0,))]
    assert [s.memory for s in sections(parse_options(bench_args()))] == [2 * GIB]  # a plain bench: one section


@pytest.mark.parametrize(("kw", "msg"), [
    ({"link_rate": "fast"}, "--link-rate: 'fast' is not a rate such as 1Gbit, 10Gbit or 500MiB/s"),
    ({"link_rate": "0"}, "--link-rate: '0': expected a rate above 0"),
    ({"link_rate": "1Gbit", "no_netns": True}, "--link-rate: the link is shaped in the bench's private network"),
    ({"memory": "1G,1M"}, "--memory 1M: expected a multiple of 4096 bytes of at least 2.00 MiB"),
    ({"memory": "1G,,"}, "--memory: empty item in '1G,,' (give items separated by single commas)"),
    ({"methods": "zstd,none,zstd"}, "--methods: 'zstd' given more than once in 'zstd,none,zstd'"),
])  # fmt: skip
def test_bad_sweep_options_are_named(kw: dict[str, Any], msg: str | None, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_cli, "run_sweep", lambda c, ch: (_ for _ in ()).throw(KeyboardInterrupt))
    code = bench_cli.main(bench_args(**kw))
    err = capsys.readouterr().err
    if msg is None:
        assert code == 130, err
    else:
        assert code == 2 and msg in err and err.count("\n") == 1, err


def _auto_run(pick: dict[str, Any] | None, total: float, bw: int = 1_250_000_000) -> Run:
    res = result(total)
    if pick is not None:
        res["livemig"]["auto"] = pick
    return Run("livemig", "auto", 8, bw, 0, res)


def test_auto_rows_show_their_pick_and_its_limit() -> None:
    b = bench_of([Run("livemig", "zstd", 8, 1_250_000_000, 0, result(2500)),
                _auto_run({"method": "zstd", "level": 1}, 2600)])
    b.config = dataclasses.replace(b.config, methods=("zstd", "auto"))
    b.codecs["zstd-1"] = CodecSpeed("zstd", 1, 100, 30, 400e6, 1000e6)
    rows = {r.method: r for r in b.rows()}
    assert rows["auto"].picked == "zstd-1" and rows["auto"].limit_ms == pytest.approx(rows["zstd"].limit_ms)
    text = render_bench(b, markdown=False)
    assert data_cells(text, "auto: zstd-1")[0] == "2600"
    assert "an auto row's limit is its picked method's" in text
    two = bench_of([_auto_run({"method": "zstd", "level": 1}, 2600), _auto_run({"method": "none", "level": None}, 900)])
    (row,) = two.rows()
    assert row.picked == "none/zstd-1" and row.limit_ms is None  # the runs disagree: no single limit


def test_link_and_size_sections_render_their_conditions_and_a_summary() -> None:
    cap = bench_of([Run("livemig", "zstd", 8, 1_250_000_000, 0, result(2500))])
    cap.config = dataclasses.replace(cap.config, memories=(GIB, 2 * GIB))
    link = bench_of([Run("livemig", "zstd", 8, 0, 0, result(3000))], bandwidths=(0,))
    link.config = dataclasses.replace(cap.config, bandwidths=(0,), link_rate=100_000_000)
    big = bench_of([Run("livemig", "zstd", 8, 1_250_000_000, 0, result(5200))])
    big.config = dataclasses.replace(cap.config, memory=2 * GIB)
    text = render_bench(link, markdown=False)
    assert "shaped to 800Mbps with tc tbf, max-bandwidth off on both engines" in text
    assert "1.00 GiB, link 800Mbps (tc tbf, max-bandwidth off):" in text
    (lrow,) = link.rows()
    assert lrow.limit_ms == pytest.approx(1000 * GIB * 30 / 100 / 100_000_000)  # the link, not the cores
    assert "1.00 GiB, cap 10Gbps:" in render_bench(cap, markdown=False)
    summary = render_sweep([cap, link, big]).splitlines()
    assert summary[1].split(" | ")[1:] == ["1.00 GiB, cap 10Gbps",
                                           "1.00 GiB, link 800Mbps (tc tbf, max-bandwidth off)", "2.00 GiB, cap 10Gbps"]
    assert [c.strip() for c in summary[2].split(" | ")] == ["zstd", "2500 (2500/GiB)", "3000 (3000/GiB)",
                                                          "5200 (2600/GiB)"]


def test_sweep_json_has_one_section_perbench_of(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    benches = [bench_of([Run("livemig", "zstd", 8, 1_250_000_000, 0, result(2500))]) for _ in range(2)]
    monkeypatch.setattr(bench_cli, "run_sweep", lambda c, ch: benches)
    out = tmp_path / "b.json"
    assert bench_cli.main(bench_args(memory="64M,128M", methods="zstd", json=str(out))) == 0
    data = json.loads(out.read_text())
    assert len(data["sections"]) == 2 and data["sections"][0]["rows"][0]["method"] == "zstd"


def test_shape_puts_a_tbf_on_the_namespace_loopback() -> None:
    with Children() as children:
        try:
            ns = NetNamespace(children)
        except Exception as exc:  # noqa: BLE001 - no unshare -n here
            pytest.skip(f"no private network namespace: {exc}")
        ns.shape(1_250_000_000)
        show = subprocess.run([*ns.prefix, "tc", "-j", "qdisc", "show", "dev", "lo"], capture_output=True,
                              text=True, check=True)
        (q,) = [q for q in json.loads(show.stdout) if q["kind"] == "tbf"]
        assert q["options"]["rate"] == 1_250_000_000 and q["options"]["burst"] >= 12_000_000  # 10 ms, in tc's ticks
        # what multifd-compression auto sees from inside the namespace
        inside = subprocess.run([*ns.prefix, "python3", "-c", "from livemig.compress.auto import link_rate;"
                                 "print(link_rate('127.0.0.1'))"], capture_output=True, text=True, check=True)
        assert inside.stdout.strip() == "(1250000000, 'tc tbf on lo')"
        ns.shape(0)
        show = subprocess.run([*ns.prefix, "tc", "-j", "qdisc", "show", "dev", "lo"], capture_output=True,
                              text=True, check=True)
        assert not [q for q in json.loads(show.stdout) if q["kind"] == "tbf"]
        ns.close()
