"""One error root for the whole project.

::

    MigrationError
    ├── ParameterError        a bad parameter, refused before anything starts (QEMU's wording)
    ├── WireError             bytes from the peer that break the wire format (names field, value, expected)
    │   └── PayloadError      a compressed payload that does not decode to what its header says
    ├── MethodUnavailable     a compression method or backend that cannot run here (says what to install)
    ├── GuestError            a guest that cannot be created, run, paused or restored
    │   └── KvmError          a failed KVM ioctl (carries the ioctl name and errno)
    ├── TransportError        a socket that closed, timed out or failed
    ├── IntegrityError        RAM or guest state that arrived but does not match the source's digest
    └── Cancelled             the migration was cancelled by the user

Lower-layer exceptions (OSError, zlib.error, ...) are wrapped where they cross into our layers, with
``raise ... from exc``, so callers only ever need to catch :class:`MigrationError`.
"""

from __future__ import annotations


class MigrationError(Exception):
    """Root of every error livemig raises on purpose."""


class ParameterError(MigrationError):
    """A parameter out of range or unknown; the text follows QEMU's wording."""


class WireError(MigrationError):
    """The peer sent bytes that break the wire format."""

    def __init__(self, what: str, value: object = None, expected: object = None) -> None:
        text = what
        if value is not None or expected is not None:
            text = f"{what}: received {value!r}, expected {expected}"
        super().__init__(text)
        self.what = what
        self.value = value
        self.expected = expected

    @classmethod
    def with_values(cls, text: str, value: object = None, expected: object = None) -> WireError:
        """An error with exactly ``text`` as its message (already naming the values), carrying them too."""
        err = cls(text)
        err.value = value
        err.expected = expected
        return err


class PayloadError(WireError):
    """A compressed payload that is corrupt, truncated, oversized or of the wrong decoded size."""


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
