"""One rendering of an error for the user, shared by every ``livemig`` command.

:func:`describe` turns an exception into words: no Python class names (not even an ``OSError:`` a
lower layer wrote into its message), no ``[Errno N]``, no prefix said twice. :func:`report_error`
prints it once on stderr, with its notes (``exc.add_note``) as further lines, and returns the exit
status: 2 for a bad option or parameter (as argparse), 3 for an unknown outcome
(:class:`OutcomeUnknown`), 130 for an interrupt (Ctrl-C, as a shell reports SIGINT), 143 for SIGTERM
(:class:`Terminated`), 1 for any other failure.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

from ..errors import Cancelled, MigrationError, ParameterError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_ERRNO = re.compile(r"\[Errno -?\d+\] ")
# "FileNotFoundError: " that a lower layer put into a message
_CLASS = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception|Interrupt): ")
# "destination: destination: x" -> "destination: x" (a context added by two layers)
_TWICE = re.compile(r"(?<![\w-])([\w][\w .-]*?): (?:\1: )+")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the command cancels and cleans up), reported as ``terminated``."""


class OutcomeUnknown(MigrationError):
    """The source committed but never heard whether the destination resumed: not known to have failed.
    Printed ``prog: outcome unknown: ...`` (no ``error:``), exit status 3."""


def describe(exc: BaseException) -> str:
    """The message of ``exc`` in words, one line, without its notes."""
    if isinstance(exc, Terminated):
        return "terminated"
    if isinstance(exc, KeyboardInterrupt | Cancelled):
        return "interrupted"
    if isinstance(exc, OSError) and not isinstance(exc, MigrationError):
        text = exc.strerror or str(exc)
        if exc.filename is not None:
            text = f"{exc.filename}: {text}"
    else:
        text = str(exc)
    text = _TWICE.sub(r"\1: ", _CLASS.sub("", _ERRNO.sub("", text))).strip()
    return text or "failed"


def exit_status(exc: BaseException) -> int:
    """2 for a refused option or parameter, 3 for an unknown outcome, 143 for SIGTERM, 130 for an
    interrupt, 1 otherwise."""
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt | Cancelled):
        return EXIT_INTERRUPTED
    if isinstance(exc, ParameterError):
        return EXIT_USAGE
    if isinstance(exc, OutcomeUnknown):
        return EXIT_UNKNOWN
    return EXIT_FAILED


def report_error(exc: BaseException, prog: str = "livemig", file: TextIO | None = None) -> int:
    """Print ``prog: error: message`` (``prog: interrupted`` for Ctrl-C, ``prog: terminated`` for SIGTERM)
    and its notes; return the exit status."""
    out = file or sys.stderr
    text = describe(exc)
    plain = isinstance(exc, KeyboardInterrupt | Cancelled | OutcomeUnknown)
    head = f"{prog}: {text}" if plain else f"{prog}: error: {text}"
    lines = [head] + [f"{prog}: {_ERRNO.sub('', note)}" for note in getattr(exc, "__notes__", [])]
    print("\n".join(lines), file=out, flush=True)
    return exit_status(exc)
