"""Post-copy's options refused before anything starts, in words, exit status 2."""

from __future__ import annotations

import pytest

from support.migrate import cli

from .test_options import one_error_line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--postcopy-after-passes", "2"), "--postcopy-after-passes needs --postcopy-ram"),
        (("--postcopy-ram", "--postcopy-after-passes", "0"),
         "--postcopy-after-passes 0: expected a number of passes 1 or more"),
        (("--postcopy-ram", "--max-postcopy-bandwidth", "fast"), "--max-postcopy-bandwidth 'fast': expected a rate"),
        (("--postcopy-ram", "--peer", "qemu"), "--postcopy-ram with a QEMU peer is not supported"),
    ],
)
def test_migrate_refuses_postcopy_options(args: tuple[str, ...], needle: str) -> None:
    one_error_line(cli("migrate", "tcp:127.0.0.1:1", "--memory", "4M", *args, timeout=60), "livemig migrate", needle)


def test_incoming_refuses_a_bad_postcopy_cap() -> None:
    one_error_line(cli("incoming", "tcp:127.0.0.1:0", "--postcopy-ram", "--max-postcopy-bandwidth", "-1", timeout=60),
                   "livemig incoming", "--max-postcopy-bandwidth '-1': expected a rate")
