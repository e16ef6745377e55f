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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MigrationError as exc:
        print(f"livemig: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("livemig: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
