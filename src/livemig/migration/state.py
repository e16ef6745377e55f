"""Migration status values and transitions, as QEMU's MigrationStatus (qemu-multifd.md §5.4).

One table of allowed transitions and one step function: an illegal transition raises an error that
names the state and the event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import MigrationError

NONE = "none"
SETUP = "setup"
ACTIVE = "active"
DEVICE = "device"
COMPLETED = "completed"
FAILED = "failed"
CANCELLING = "cancelling"
CANCELLED = "cancelled"

#: state -> states it may move to
TRANSITIONS: dict[str, frozenset[str]] = {
    NONE: frozenset({SETUP, FAILED, CANCELLING}),
    SETUP: frozenset({ACTIVE, FAILED, CANCELLING}),
    ACTIVE: frozenset({DEVICE, FAILED, CANCELLING}),
    DEVICE: frozenset({COMPLETED, FAILED, CANCELLING}),
    CANCELLING: frozenset({CANCELLED, FAILED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

FINAL = frozenset({COMPLETED, FAILED, CANCELLED})


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
