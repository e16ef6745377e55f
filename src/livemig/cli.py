"""The ``livemig`` command line.

Subcommands come from modules that define ``add_commands(subparsers)``, listed in
``_COMMAND_MODULES``; a module that cannot be imported is skipped with a warning on stderr, so one
broken optional part never takes the whole command line down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MigrationError
from .ui.errors import report_error

_COMMAND_MODULES = [
    "livemig.migration.cli",
    "livemig.accel.cli",
    "livemig.bench.cli",
    "livemig.vm.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livemig",
        description="Live migration of virtual machines over QEMU's multifd wire format.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if not (exc.name or "").startswith(name):
                print(f"livemig: warning: commands of {name} unavailable: {exc}", file=sys.stderr)
            continue
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a failure it raises is printed once (:func:`livemig.ui.errors.report_error`).

    Exit status: the command's own, 2 for a bad option, 130 for Ctrl-C, 1 for another failure.
    """
    prog = "livemig"
    try:
        args = build_parser().parse_args(argv)
        prog = f"livemig {args.command}"
        code: int = args.func(args)
    except (MigrationError, OSError, KeyboardInterrupt) as exc:
        return report_error(exc, prog)
    return code


if __name__ == "__main__":
    sys.exit(main())
