"""One error root for the whole project.

::

    MigrationError
    ├── ParameterError        a bad parameter, refused before anything starts (QEMU's wording)
    ├── WireError             bytes from the peer that break the wire format (names field, value, expected)
    │   └── PayloadError      a compressed payload that does not decode to what its header says
    ├── LocalWireError        bytes we were asked to write that the wire format cannot carry (our bug, not the peer's)
    ├── MethodUnavailable     a compression method or backend that cannot run here (says what to install)
    ├── GuestError            a guest that cannot be created, run, paused or restored
    │   └── KvmError          a failed KVM ioctl (carries the ioctl name and errno)
    ├── TransportError        a socket that closed, timed out or failed
    ├── IntegrityError        RAM or guest state that arrived but does not match the source's digest
    └── Cancelled             the migration was cancelled by the user

:class:`WireError` and :class:`LocalWireError` split as h11's ``RemoteProtocolError`` and
``LocalProtocolError`` do: the first blames the peer, the second the caller on this side (a writer
given a non-ASCII idstr, a reader fed after the end of the stream).

Lower-layer exceptions (OSError, zlib.error, ...) are wrapped where they cross into our layers, with
``raise ... from exc``, so callers only ever need to catch :class:`MigrationError`.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Root of every error livemig raises on purpose."""


class ParameterError(MigrationError):
    """A parameter out of range or unknown; the text follows QEMU's wording."""


def _shown(item: object, as_hex: bool, quote: bool) -> str:
    if as_hex and isinstance(item, int) and not isinstance(item, bool):
        return f"{item:#x}"
    return repr(item) if quote else str(item)


class WireError(MigrationError):
    """The peer sent bytes that break the wire format.

    ``WireError(what, value, expected, note=..., hex=...)`` reads
    ``"{what}: received {value!r}, expected {expected}"``, then ``" ({note})"`` when a note is
    given (QEMU's own wording for the same failure, or why the value is refused). With ``hex=True``
    integer values and expectations are shown as ``0x...``. A text-only ``WireError(what)`` is the
    bare text. ``value`` and ``expected`` are kept as attributes, unformatted.
    """

    def __init__(
        self, what: str, value: object = None, expected: object = None, *, note: str = "", hex: bool = False
    ) -> None:
        text = what
        if value is not None or expected is not None:
            text = f"{what}: received {_shown(value, hex, True)}, expected {_shown(expected, hex, False)}"
        if note:
            text += f" ({note})"
        super().__init__(text)
        self.what = what
        self.value = value
        self.expected = expected


class PayloadError(WireError):
    """A compressed payload that is corrupt, truncated, oversized or of the wrong decoded size."""


class LocalWireError(MigrationError):
    """This side asked a wire writer (or a reader's setup) for something the format cannot carry.

    Raised before any byte is produced: a page of the wrong size, an offset that is not page
    aligned, a name that is not ASCII or too long, a value that does not fit its field.
    """


class MethodUnavailable(MigrationError):
    """A compression method (or one of its backends) cannot run on this host."""


class GuestError(MigrationError):
    """A guest could not be created, run, paused or restored."""


class TransportError(MigrationError):
    """A channel closed, failed or timed out."""


class IntegrityError(MigrationError):
    """Data arrived whole on the wire but does not match what the source had."""


class Cancelled(MigrationError):
    """The migration was cancelled."""


def os_reason(exc: BaseException) -> str:
    """The words of an OS-level error without Python's ``[Errno N]`` prefix (``Broken pipe``), for
    messages that wrap it; other exceptions as ``str(exc)``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
