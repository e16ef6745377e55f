"""Bad options of ``livemig advise`` and ``livemig bench``, as a user meets them: a real process, exit
status 2 before anything runs, one error line naming the option, no Python internals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
INTERNALS = re.compile(r"Traceback|\w+Error\b|\w+Exception\b|\[Errno")


def livemig(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from livemig.cli import main; sys.exit(main())", *argv],
        capture_output=True, text=True, env=env, timeout=120, cwd=cwd,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], command: str, option: str, *words: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"livemig {command}: error: {option}"), proc.stderr
    assert not INTERNALS.search(proc.stderr), proc.stderr
    for w in words:
        assert w in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "argv,option,words",
    [
        (["--fill", "bogus"], "--fill", ["'bogus'", "files:DIR"]),
        (["--fill", "mixed"], "--fill", ["'mixed'"]),  # a test pattern, not a guest fill: same set as migrate
        (["--fill", "files:/nonexistent/dir"], "--fill", ["not a directory"]),
        (["--fill", "image:/nonexistent/img"], "--fill", ["not a regular file"]),
        (["--cores", "-1", "--sample-size", "1M"], "--cores -1", ["1 or more"]),
        (["--cores", "0"], "--cores 0", ["1 or more"]),
        (["--sample-size", "0"], "--sample-size 0", ["524288 or more"]),
        (["--sample-size", "abc"], "--sample-size 'abc'", ["a size like"]),
        (["--bandwidth", "fast"], "--bandwidth 'fast'", ["a rate like"]),
        (["--multifd-channels", "0"], "--multifd-channels 0", ["at most 255"]),
        (["--methods", "lz4"], "--methods", ["unknown method 'lz4'", "zstd"]),
        (["--methods", "zstd:x"], "--methods 'zstd:x'", ["not a number"]),
        (["--methods", "qatzip:12"], "--methods 'qatzip:12'", ["between 1 and 9"]),
        (["--methods", "none:3"], "--methods 'none:3'", ["no level"]),
    ],
)
def test_advise_refuses_bad_options(argv: list[str], option: str, words: list[str]) -> None:
    assert_refused(livemig("advise", *argv), "advise", option, *words)


def test_advise_help_uses_the_metavars_of_migrate() -> None:
    out = livemig("advise", "--help").stdout
    assert "--multifd-channels N" in out and "--sample-size SIZE" in out and "--bandwidth RATE" in out
    assert "MULTIFD_CHANNELS" not in out and "SAMPLE_SIZE" not in out
    assert "mixed" not in out and "files:DIR" in out


@pytest.mark.parametrize(
    "argv,option,words",
    [
        (["--memory", "1M", "--methods", "none"], "--memory 1M", ["multiple of 4096", "2.00 MiB"]),
        (["--fill", "files:/nonexistent/dir"], "--fill", ["not a directory"]),
        (["--fill", "image:/nonexistent/img"], "--fill", ["not a regular file"]),
        (["--json", "/nonexistent/x.json"], "--json /nonexistent/x.json", ["does not exist"]),
        (["--plot", "/nonexistent/x/y"], "--plot /nonexistent/x/y", ["does not exist"]),
        (["--bandwidth", "fast"], "--bandwidth", ["'fast'"]),
        (["--sample", "abc"], "--sample 'abc'", ["a size like"]),
        (["--timeout", "0"], "--timeout 0", ["greater than 0"]),
        (["--memory", "1G,,"], "--memory", ["empty item", "'1G,,'"]),
        (["--methods", "zstd,zstd"], "--methods", ["'zstd'", "more than once"]),
        (["--bandwidth", "1Gbps,,0"], "--bandwidth", ["empty item"]),
        (["--link-rate", "1Gbit,1gbit"], "--link-rate", ["'1Gbit', '1gbit'", "more than once"]),
    ],
)
def test_bench_refuses_bad_options_before_anything_runs(argv: list[str], option: str, words: list[str]) -> None:
    assert_refused(livemig("bench", *argv), "bench", option, *words)
    assert not os.path.exists("/nonexistent")  # nothing created on the way


def test_bench_empty_fill_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    assert_refused(livemig("bench", "--fill", f"files:{tmp_path}"), "bench", "--fill", "no regular file with data")
