"""The command line's parser: argparse, with every refusal said once, in one line, naming the option.

:class:`OptionParser` is the ``ArgumentParser`` of ``livemig`` and (through ``add_subparsers``) of
every subcommand. Compared with argparse's own behaviour:

- a refused value is one line, ``livemig migrate: error: --timeout 'abc': expected a number (see
  'livemig migrate --help')``, exit status 2, without the usage dump;
- a value may start with ``-`` (``--memory -5M``, ``--max-passes -1``): it is then checked as a value
  and refused in words, not taken for an unknown option;
- option names are never abbreviated (``allow_abbrev=False``): ``--mem`` is an unknown option.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

#: argparse's type names -> the accepted form, in words
_FORMS = {"int": "an integer", "float": "a number"}


def reword(message: str) -> str:
    """argparse's ``argument --timeout: invalid float value: 'abc'`` -> ``--timeout 'abc': expected a number``."""
    m = re.fullmatch(r"argument (\S+): (.*)", message, re.S)
    if not m:
        return message
    name, rest = m.group(1).split("/")[-1], m.group(2)
    if v := re.fullmatch(r"invalid (\w+) value: (.*)", rest):
        return f"{name} {v.group(2)}: expected {_FORMS.get(v.group(1), 'a valid value')}"
    if v := re.fullmatch(r"invalid choice: (.*) \(choose from (.*)\)", rest):
        return f"{name} {v.group(1)}: expected one of {v.group(2).replace(chr(39), '')}"
    if rest.startswith("expected "):
        return f"{name}: expected a value"
    return f"{name}: {rest}"


class OptionParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line naming the option (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE (see 'PROG --help')`` on stderr and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {reword(message)} (see '{self.prog} --help')\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """As argparse, but ``--opt -5`` gives ``-5`` to ``--opt`` when ``--opt`` takes one value."""
        given = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        i = 0
        while i < len(given):
            arg = given[i]
            if arg == "--":
                joined += given[i:]
                break
            action = self._option_string_actions.get(arg)
            nxt = given[i + 1] if i + 1 < len(given) else ""
            if (action is not None and action.nargs is None and len(nxt) > 1 and nxt.startswith("-")
                    and nxt != "--" and nxt.split("=")[0] not in self._option_string_actions):
                joined.append(f"{arg}={nxt}")
                i += 2
                continue
            joined.append(arg)
            i += 1
        return super().parse_known_args(joined, namespace)
