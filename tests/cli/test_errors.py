"""The one rendering of errors for the user: words, printed once, with the exit status."""

from __future__ import annotations

import io

import pytest

from livemig.errors import Cancelled, MigrationError, ParameterError, TransportError, WireError
from livemig.ui.errors import describe, exit_status, report_error


@pytest.mark.parametrize(
    ("exc", "text", "status"),
    [
        (ParameterError("--timeout 0: expected a number of seconds greater than 0"),
         "--timeout 0: expected a number of seconds greater than 0", 2),
        (KeyboardInterrupt(), "interrupted", 130),
        (Cancelled("migration cancelled"), "interrupted", 130),
        (TransportError("cannot connect to tcp:127.0.0.1:1: [Errno 111] Connection refused"),
         "cannot connect to tcp:127.0.0.1:1: Connection refused", 1),
        (MigrationError("failed (destination: destination: guest differs)"), "failed (destination: guest differs)", 1),
        (MigrationError("destination: destination: destination: x"), "destination: x", 1),
        (FileNotFoundError(2, "No such file or directory", "/nonexist/r.json"),
         "/nonexist/r.json: No such file or directory", 1),
        (WireError("multifd: magic", 0x1122, "0x11223344"), "multifd: magic: received 4386, expected 0x11223344", 1),
        (MigrationError(""), "failed", 1),
        (MigrationError("destination failed: destination: FileNotFoundError: No such file or directory: '/x'"),
         "destination failed: destination: No such file or directory: '/x'", 1),
    ],
)
def test_describe_and_status(exc: BaseException, text: str, status: int) -> None:
    assert describe(exc) == text
    assert exit_status(exc) == status


def test_a_repeated_word_that_is_not_a_prefix_stays() -> None:
    assert describe(MigrationError("source uses 2, destination 3")) == "source uses 2, destination 3"


def test_report_prints_once_with_notes_and_no_python_names() -> None:
    err = MigrationError("migration failed: cannot connect: [Errno 111] Connection refused")
    err.add_note("after 0.0 s, 0 B transferred; the source guest is running")
    out = io.StringIO()
    assert report_error(err, "livemig migrate", out) == 1
    assert out.getvalue() == ("livemig migrate: error: migration failed: cannot connect: Connection refused\n"
                              "livemig migrate: after 0.0 s, 0 B transferred; the source guest is running\n")


def test_report_interrupt() -> None:
    out = io.StringIO()
    assert report_error(KeyboardInterrupt(), "livemig incoming", out) == 130
    assert out.getvalue() == "livemig incoming: interrupted\n"
