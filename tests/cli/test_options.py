"""Every option refused before anything starts: one line naming the option and the accepted form, exit
status 2, no usage dump, no Python wording; the guest options checked by the bounds the guests enforce."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.migrate import cli

PYTHON_WORDS = ("Traceback", "Error", "Exception", "invalid float value", "invalid int value", "usage:",
                "Parameter '", "expected one argument")


def one_error_line(r: object, prog: str, *needles: str) -> None:
    """Exit status 2, stdout empty, stderr one ``PROG: error:`` line containing every needle."""
    code, out, err = r.returncode, r.stdout, r.stderr  # type: ignore[attr-defined]
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    for needle in needles:
        assert needle in err, err
    for word in PYTHON_WORDS:
        assert word not in err, err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # guest bounds (GuestConfig.check: the KVM layout's, the portable guest's, the fill's)
        (("--guest", "kvm", "--memory", "1M"), ("--memory 1M: expected a multiple of 4096 of at least 2 MiB",)),
        (("--guest", "kvm", "--memory", "1.5M"), ("--memory 1.5M: expected a multiple of 4096 of at least 2 MiB",)),
        (("--guest", "kvm", "--memory", "100T"), ("--memory 100T: at most 256 GiB",)),
        (("--guest", "kvm", "--smp", "1000"), ("--smp 1000: expected 1..64",)),
        (("--guest", "portable", "--smp", "1000"), ("--smp 1000: out of range 1..",)),
        (("--guest", "portable", "--memory", "4K"), ("--memory 4K: must be at least 2 pages",)),
        (("--guest", "portable", "--memory", "64T"), ("--memory 64T: more than this host can give",)),
        (("--fill", "files:/nonexistent"), ("--fill files:/nonexistent: not a directory",)),
        (("--fill", "image:/nonexistent"), ("--fill image:/nonexistent: cannot open",)),
        # argparse's refusals, reworded
        (("--timeout", "abc"), ("--timeout 'abc': expected a number", "see 'livemig migrate --help'")),
        (("--multifd-channels", "x"), ("--multifd-channels 'x': expected an integer",)),
        (("--guest", "x"), ("--guest 'x': expected one of kvm, portable",)),
        (("--memory",), ("--memory: expected a value",)),
        (("--mem", "4M"), ("unrecognized arguments: --mem",)),  # no abbreviations
        # negative values are values, checked in words
        (("--memory", "-5M"), ("--memory '-5M': expected a size like",)),
        (("--max-passes", "-1"), ("--max-passes -1: expected a value of 0 (never) or more",)),
        (("--downtime-limit", "-1"), ("--downtime-limit -1: expected an integer in the range of 0 to 2000000 "
                                      "milliseconds",)),
        (("--smp", "-2"), ("--smp -2: expected a number of vCPUs 1 or more",)),
        (("--multifd-compression", "foo"), ("--multifd-compression foo: not accepted (known: none",)),
        # seconds: finite, at least 0.1
        (("--timeout", "inf"), ("--timeout inf: expected a finite number of seconds 0.1 or more",)),
        (("--timeout", "nan"), ("--timeout nan: expected a finite number of seconds",)),
        (("--timeout", "0.001"), ("--timeout 0.001: expected a number of seconds 0.1 or more",)),
        (("--run-after", "inf"), ("--run-after inf: expected a finite number of seconds",)),
    ],
)
def test_migrate_refuses_before_anything_starts(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    one_error_line(cli("migrate", "--local", *args, timeout=60), "livemig migrate", *needles)


@pytest.mark.parametrize(
    ("command", "args", "needle"),
    [
        ("incoming", ("tcp:127.0.0.1:0", "--guest", "kvm", "--memory", "1M"), "--memory 1M: expected a multiple"),
        ("incoming", ("tcp:127.0.0.1:0", "--smp", "1000", "--memory", "4M"), "--smp 1000:"),
        ("incoming", ("tcp:127.0.0.1:0", "--timeout", "inf"), "--timeout inf: expected a finite number"),
        ("vm", ("--guest", "kvm", "-m", "1M"), "--memory 1M: expected a multiple"),
        ("vm", ("--fill", "files:/nonexistent"), "--fill files:/nonexistent: not a directory"),
        ("bench", ("--nope",), "unrecognized arguments: --nope"),
    ],
)
def test_other_commands_refuse_in_the_same_words(command: str, args: tuple[str, ...], needle: str) -> None:
    one_error_line(cli(command, *args, timeout=60), f"livemig {command}", needle)


def test_the_help_explains_the_guest_options() -> None:
    migrate = " ".join(cli("migrate", "--help").stdout.split())
    incoming = " ".join(cli("incoming", "--help").stdout.split())
    for text in ("idle (nothing", "dirty (write pages", "counter (each vCPU", "seed of the random fill",
                 "vCPUs: 1..64"):
        assert text in migrate, text
    assert "ignored here: the source's config replaces it" in incoming
    assert "must be the source's" in incoming
    assert "with --local and --run-after the destination checks every value" in migrate


def test_the_vm_help_mentions_only_its_own_options() -> None:
    vm = " ".join(cli("vm", "--help").stdout.split())
    assert "counter (each vCPU" in vm and "--run-after" not in vm and "--local" not in vm


def test_an_image_larger_than_ram_is_refused_before_anything_starts(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(5 << 20))
    r = cli("migrate", "--local", "--guest", "portable", "--memory", "4M", "--fill", f"image:{image}", timeout=60)
    one_error_line(r, "livemig migrate", f"--fill image:{image}: image is 5242880 bytes, larger than guest RAM")
