"""``livemig advise``'s table: each side's CPU as a share of that side's cores, and its help text."""

from __future__ import annotations

import pytest

from livemig.advise import Advice, Measurement, predict, render
from livemig.cli import main


def _advice(cores: int) -> Advice:
    # a sender-limited zstd: 2 threads of 500 MB/s compress; decompress 3x faster
    m = Measurement("zstd", 1, "cpu: test", False, 3.0, 500e6, 1500e6, 1 / 500e6, 1 / 1500e6, 1000e6, 3000e6, 2)
    p = predict(m, 10 * 10**9 // 8, 8, cores)
    return Advice(10 * 10**9 // 8, 8, cores, "corpus", 1 << 20, [p], "zstd", 1, "test")


def test_cpu_columns_are_a_share_of_each_sides_cores() -> None:
    adv = _advice(2)
    p = adv.predictions[0]
    assert p.limit == "sender" and p.send_cpu_percent == pytest.approx(200)  # two cores busy (100 = one core)
    lines = render(adv).splitlines()
    assert "send CPU" in lines[1] and "recv CPU" in lines[1]
    assert lines[2].count("of 2 cores") == 2
    row = next(ln for ln in lines if ln.startswith("zstd-1"))
    cells = row.split()
    # source: all of its 2 cores; destination: 1000 MB/s at 1500 MB/s per core = 2/3 of a core = 33 % of 2
    assert cells[cells.index("Gbps") + 1 : cells.index("Gbps") + 3] == ["100%", "33%"]
    assert "as a share of that side's 2 cores" in render(adv)


def test_advise_help_shows_a_plain_percent_free_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["advise", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # as wrapped at any terminal width
    assert "%%" not in text and "each side's CPU use" in text


def test_a_long_backend_wraps_whole_under_its_column() -> None:
    adv = _advice(2)
    backend = "cpu: ISA-L 1.9.1 deflate level 1, same wire format (no QAT device: the guest RAM without a copy)"
    adv.predictions[0].measurement.backend = backend
    lines = render(adv).splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("zstd-1"))
    column = lines[1].index("backend")
    rows = [lines[first]] + [ln for ln in lines[first + 1 :] if ln.startswith(" " * column) and ln.strip()]
    assert len(rows) > 1 and all(len(r) - column <= 60 for r in rows)
    assert " ".join(r[column:] for r in rows) == backend  # every word, none cut
