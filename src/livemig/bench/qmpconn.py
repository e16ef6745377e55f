"""A synchronous QMP connection through ``qemu.qmp`` (QEMU's own client), for both bench peers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from .model import BenchError

T = TypeVar("T")


class QmpConnection:
    """A synchronous QMP connection to one QEMU: ``qemu.qmp``'s QMPClient on a private event loop.

    Errors are BenchError naming the QMP socket or command (the ``qemu.qmp`` exception is kept as
    the cause).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

    def _run(self, aw: Awaitable[T], timeout: float | None) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(aw, timeout))

    @classmethod
    def connect(cls, path: str | tuple[str, int], name: str, timeout: float = 30.0) -> QmpConnection:
        """Connect to the UNIX socket ``path`` (or a (host, port) TCP address; retried until QEMU
        listens or ``timeout`` s), greet, negotiate capabilities. Raises BenchError."""
        conn = cls(name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn._run(conn._client.connect(path), max(0.1, deadline - time.monotonic()))
                return conn
            except (TimeoutError, ConnectError) as exc:
                if time.monotonic() > deadline:
                    conn.close()
                    raise BenchError(f"cannot connect to {name}'s QMP socket {path} within {timeout:.0f} s") from exc
                time.sleep(0.05)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """Run ``command`` and return its ``return`` value. Raises BenchError naming the command."""
        what = f"QMP {command} {json.dumps(arguments or {})} on {self.name}"
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise BenchError(f"{what} failed: {exc.error_class}: {exc}") from exc
        except (TimeoutError, QMPError, OSError, EOFError) as exc:
            raise BenchError(f"{what} failed: {type(exc).__name__}: {exc or 'no reply'}") from exc

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next QMP event received (``{"event", "data", "timestamp"}``), or None when none
        arrives within ``timeout`` s. Events queue from the moment of connecting."""
        try:
            return dict(self._run(self._client.events.get(), timeout))
        except TimeoutError:
            return None

    def close(self) -> None:
        """Disconnect (QEMU may already be gone) and close the event loop."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(TimeoutError, QMPError, OSError, EOFError):
            self._run(self._client.disconnect(), 5.0)
        self._loop.close()
