"""Units, parameters (QEMU names, defaults, ranges and wording), addresses."""

from __future__ import annotations

from typing import Any

import pytest

from livemig.errors import ParameterError
from livemig.params import QEMU_MAX_THROTTLE, MigrationParameters, check_option, parse_option
from livemig.transport.address import parse_address
from livemig.units import parse_rate, parse_size, plural


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("64k", 65536), ("1T", 1 << 40)],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("10Gbps", 1_250_000_000), ("100Mbit/s", 12_500_000), ("1GiB/s", 1 << 30), ("128M", 128 << 20), ("0", 0)],
)
def test_rates(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("bad", ["", "ten", "1X", "-1G"])
def test_bad_sizes_name_the_text(bad: str) -> None:
    with pytest.raises(ParameterError, match="invalid size"):
        parse_size(bad)


def test_defaults_are_qemus() -> None:
    p = MigrationParameters()
    assert (p.multifd_channels, p.multifd_compression, p.multifd_zlib_level, p.multifd_zstd_level) == (2, "none", 1, 1)
    assert (p.multifd_qatzip_level, p.downtime_limit, p.max_bandwidth) == (1, 300, QEMU_MAX_THROTTLE)
    p.check()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("multifd-channels", 0, "Parameter 'multifd_channels' expects a value between 1 and 255"),
        ("multifd-channels", 256, "Parameter 'multifd_channels' expects a value between 1 and 255"),
        ("multifd-zlib-level", 10, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
        ("multifd-zstd-level", 21, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
        ("multifd-qatzip-level", 0, "Parameter 'multifd_qatzip_level' expects a value between 1 and 9"),
        ("downtime-limit", 2_000_001, "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000"),
        ("multifd-compression", "lz4", "Parameter 'multifd-compression' does not accept value 'lz4'"),
        ("no-such-thing", 1, "Parameter 'no-such-thing' not found"),
    ],
)
def test_bad_parameters_refused_in_qemus_words(name: str, value: object, message: str) -> None:
    p = MigrationParameters()
    with pytest.raises(ParameterError) as info:
        p.set(name, value)
    assert str(info.value).startswith(message)
    assert p == MigrationParameters()  # a refused value leaves the parameters unchanged


def test_set_parameter_like_hmp() -> None:
    p = MigrationParameters()
    p.set("multifd-compression", "zstd")
    p.set("multifd-channels", "8")
    p.set("max-bandwidth", "1000")  # HMP: bare number = MiB/s
    assert (p.multifd_compression, p.multifd_channels, p.max_bandwidth) == ("zstd", 8, 1000 << 20)
    assert p.to_qapi()["multifd-compression"] == "zstd"


def test_addresses() -> None:
    a = parse_address("tcp:127.0.0.1:4444")
    assert (a.host, a.port) == ("127.0.0.1", 4444)
    assert parse_address("tcp::5555").host == "0.0.0.0"
    assert parse_address("tcp:[::1]:6").host == "::1"
    with pytest.raises(ParameterError, match="expected tcp:HOST:PORT"):
        parse_address("exec:cat")
    with pytest.raises(ParameterError, match="port 'x' is not a number"):
        parse_address("tcp:localhost:x")


@pytest.mark.parametrize(
    ("option", "text", "kind", "words"),
    [
        ("--max-bandwidth", "10gigs", "rate", "--max-bandwidth '10gigs': expected a rate like 10Gbps"),
        ("--max-bandwidth", "-1G", "rate", "1GiB/s"),
        ("--memory", "1X", "size", "--memory '1X': expected a size like 4096, 512M, 2G"),
    ],
)
def test_option_parse_errors_name_the_option_and_the_forms(option: str, text: str, kind: str, words: str) -> None:
    with pytest.raises(ParameterError) as info:
        parse_option(option, text, kind)  # type: ignore[arg-type]
    assert words in str(info.value)
    assert isinstance(info.value.__cause__, ParameterError)  # the parser's own error kept as the cause


def test_option_parse_values() -> None:
    assert parse_option("--max-bandwidth", "10Gbps", "rate") == 1_250_000_000
    assert parse_option("--memory", "512M", "size") == 512 << 20


def test_a_bad_rate_is_called_a_rate() -> None:
    with pytest.raises(ParameterError, match="invalid rate '10gigs'"):
        parse_rate("10gigs")


@pytest.mark.parametrize(
    ("option", "value", "kwargs", "message"),
    [
        ("--timeout", 0.0, {"above": True, "what": "a number of seconds"},
         "--timeout 0: expected a number of seconds greater than 0"),
        ("--run-after", -3.0, {"what": "a number of seconds"},
         "--run-after -3: expected a number of seconds 0 or more"),
        ("--smp", 0, {"minimum": 1, "what": "a number of vCPUs"}, "--smp 0: expected a number of vCPUs 1 or more"),
        ("--level", 12, {"minimum": 1, "maximum": 9}, "--level 12: expected a number 1 or more and at most 9"),
        ("--timeout", float("nan"), {"above": True}, "--timeout nan: expected a finite number greater than 0"),
        ("--timeout", float("inf"), {"minimum": 0.1, "what": "a number of seconds"},
         "--timeout inf: expected a finite number of seconds 0.1 or more"),
        ("--dirty-rate", float("inf"), {"what": "pages per second"},
         "--dirty-rate inf: expected finite pages per second 0 or more"),
    ],
)
def test_check_option_refuses_out_of_range(option: str, value: float, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ParameterError) as info:
        check_option(option, value, **kwargs)
    assert str(info.value) == message


def test_check_option_accepts_the_bounds() -> None:
    check_option("--run-after", 0)
    check_option("--level", 9, minimum=1, maximum=9)
    check_option("--timeout", 0.001, above=True)


def test_max_passes_refused_below_zero() -> None:
    with pytest.raises(ParameterError, match="Parameter 'max_passes' expects a value of 0"):
        MigrationParameters(max_passes=-1).check()


def test_plural() -> None:
    assert (plural(1, "channel"), plural(8, "channel"), plural(0, "page")) == ("1 channel", "8 channels", "0 pages")


def test_unix_addresses_print_as_given() -> None:
    a = parse_address("unix:/run/livemig.sock")
    assert (a.scheme, a.path, str(a)) == ("unix", "/run/livemig.sock", "unix:/run/livemig.sock")
    assert a.with_port(4444) == a
    assert str(parse_address("tcp:127.0.0.1:0").with_port(4444)) == "tcp:127.0.0.1:4444"
    assert str(parse_address("tcp:[::1]:0").with_port(5)) == "tcp:[::1]:5"
    with pytest.raises(ParameterError, match="unix: needs a path"):
        parse_address("unix:")
