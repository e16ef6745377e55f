"""The ``livemig`` command line.

Subcommands come from modules that define ``add_commands(subparsers)``, listed in
``_COMMAND_MODULES``; a module that cannot be imported is skipped with a warning on stderr, so one
broken optional part never takes the whole command line down.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import Any

from .errors import MigrationError
from .ui.errors import Terminated, report_error
from .ui.options import OptionParser

_COMMAND_MODULES = [
    "livemig.migration.cli",
    "livemig.accel.cli",
    "livemig.bench.cli",
    "livemig.vm.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(
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
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # its own errors say "livemig COMMAND: error: ..."
    return parser


def _terminate(*_: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one command; a failure it raises is printed once (:func:`livemig.ui.errors.report_error`).

    SIGTERM is handled as Ctrl-C (:class:`~livemig.ui.errors.Terminated`, a KeyboardInterrupt): the
    command cancels what runs and cleans up. Exit status: the command's own, 2 for a bad option, 130
    for Ctrl-C, 143 for SIGTERM, 1 for another failure.
    """
    given = sys.argv[1:] if argv is None else argv
    # the prefix of every line this command prints, the same from the first instant on
    prog = f"livemig {given[0]}" if given and not given[0].startswith("-") else "livemig"
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        args, extra = build_parser().parse_known_args(given)
        if extra:
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        prog = f"livemig {args.command}"
        code: int = args.func(args)
    except (MigrationError, OSError, KeyboardInterrupt) as exc:
        return report_error(exc, prog)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return code


if __name__ == "__main__":
    sys.exit(main())
