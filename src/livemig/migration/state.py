"""Migration status values and transitions, as QEMU's MigrationStatus (docs/wire.md, "Statistics"),
and the first failure of a migration.

One table of allowed transitions and one step function: an illegal transition raises an error that
names the state and the event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import MigrationError, os_reason

NONE = "none"
SETUP = "setup"
ACTIVE = "active"
DEVICE = "device"
COMPLETED = "completed"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
#: post-copy (capability ``postcopy-ram``, docs/postcopy.md, "States"): the guest runs on the
#: destination and pulls its missing pages; paused: the link broke, both sides wait for recovery;
#: recover: a new link is being set up (``migrate-recover`` / ``migrate ... resume=true``)
POSTCOPY_ACTIVE = "postcopy-active"
POSTCOPY_PAUSED = "postcopy-paused"
POSTCOPY_RECOVER = "postcopy-recover"

#: state -> states it may move to
TRANSITIONS: dict[str, frozenset[str]] = {
    NONE: frozenset({SETUP, FAILED, CANCELLING}),
    SETUP: frozenset({ACTIVE, FAILED, CANCELLING}),
    ACTIVE: frozenset({DEVICE, FAILED, CANCELLING}),
    DEVICE: frozenset({COMPLETED, FAILED, CANCELLING, POSTCOPY_ACTIVE}),
    # from here on neither side holds the whole guest: no cancel (QEMU refuses it), a broken link pauses
    POSTCOPY_ACTIVE: frozenset({COMPLETED, FAILED, POSTCOPY_PAUSED}),
    POSTCOPY_PAUSED: frozenset({POSTCOPY_RECOVER, FAILED}),
    POSTCOPY_RECOVER: frozenset({POSTCOPY_ACTIVE, POSTCOPY_PAUSED, FAILED}),
    CANCELLING: frozenset({CANCELLED, FAILED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

FINAL = frozenset({COMPLETED, FAILED, CANCELLED})
#: the post-copy states: the guest runs on the destination, the source holds pages it still needs
POSTCOPY = frozenset({POSTCOPY_ACTIVE, POSTCOPY_PAUSED, POSTCOPY_RECOVER})


class StatusMachine:
    """Thread-safe holder of the current status; listeners hear every change."""

    def __init__(self) -> None:
        self._state = NONE
        self._lock = threading.Lock()
        self.listeners: list[Callable[[str], None]] = []

    @property
    def state(self) -> str:
        return self._state

    def step(self, new: str) -> None:
        """Move to ``new``; MigrationError if the table does not allow it."""
        with self._lock:
            if new not in TRANSITIONS[self._state]:
                raise MigrationError(f"migration status cannot go from '{self._state}' to '{new}'")
            self._state = new
        for listener in self.listeners:
            listener(new)

    def try_step(self, new: str) -> bool:
        """Like step, but returns False instead of raising."""
        with self._lock:
            if new not in TRANSITIONS[self._state]:
                return False
            self._state = new
        for listener in self.listeners:
            listener(new)
        return True


def in_context(where: str, exc: BaseException) -> MigrationError:
    """A MigrationError whose message is ``where: <exc>``, raised from ``exc``.

    The original exception is kept whole as ``__cause__`` (its type and fields, e.g. a WireError's
    ``value``/``expected`` or a KvmError's ``ioctl``/``errno``), never rebuilt: not every exception
    class can be constructed from one message. Exceptions that are not a MigrationError also get
    their type name in the message (``where: ValueError: ...``), except OS errors, given in words.
    """
    if isinstance(exc, MigrationError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        text = os_reason(exc)  # an OS error in words, without "[Errno N]"
    else:
        text = f"{type(exc).__name__}: {exc}"  # not expected: keep the type, it is a bug to report
    err = MigrationError(f"{where}: {text}")
    err.__cause__ = exc
    return err


class FirstFailure:
    """The first failure of a migration, with where it happened; thread-safe.

    Later failures are dropped: they are consequences of the first (sockets shut down because of it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: MigrationError | None = None

    def record(self, exc: BaseException, where: str) -> bool:
        """Keep ``exc`` (see :func:`in_context`) if it is the first; True if it was."""
        with self._lock:
            if self.error is not None:
                return False
            self.error = in_context(where, exc)
            return True

    def check(self) -> None:
        """Raise the recorded failure, if any."""
        if self.error is not None:
            raise self.error
