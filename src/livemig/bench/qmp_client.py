"""A small synchronous QMP client (QEMU Machine Protocol over a UNIX socket), for driving QEMU.

Protocol (QEMU docs/interop/qmp-spec): the server sends a greeting ``{"QMP": {...}}``; the client
sends ``{"execute": "qmp_capabilities"}``; every command ``{"execute": name, "arguments": {...},
"id": n}`` gets exactly one reply ``{"return": ...}`` or ``{"error": {"class", "desc"}}`` with the
same id; asynchronous ``{"event": ...}`` messages may arrive at any time and are kept in
:attr:`QMPClient.events`. Messages are JSON objects separated by CRLF.

Errors: :class:`QMPError` (a MigrationError) carries the command, its arguments and the reply.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from ..errors import MigrationError, TransportError


class QMPError(MigrationError):
    """A QMP command that failed, with what was sent and what came back."""

    def __init__(self, command: str, arguments: dict[str, Any] | None, reply: dict[str, Any] | str) -> None:
        if isinstance(reply, dict):
            err = reply.get("error", {})
            text = f"{err.get('class', 'Error')}: {err.get('desc', reply)}"
        else:
            text = reply
        super().__init__(f"QMP {command} {json.dumps(arguments or {})} failed: {text}")
        self.command = command
        self.arguments = arguments
        self.reply = reply


class QMPClient:
    """One QMP connection. Use :meth:`connect`, then :meth:`execute`; :meth:`close` when done."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._id = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> QMPClient:
        """Connect to ``path`` (retrying until it exists or ``timeout``), read the greeting,
        negotiate capabilities. Raises TransportError or QMPError."""
        client = cls()
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError as exc:
                s.close()
                last = exc
                if time.monotonic() > deadline:
                    raise TransportError(f"cannot connect to QMP socket {path}: {last}") from exc
                time.sleep(0.05)
        s.settimeout(timeout)
        client.sock = s
        greeting = client._read()
        if "QMP" not in greeting:
            raise QMPError("greeting", None, f"expected a QMP greeting, received {greeting!r}")
        client.greeting = greeting["QMP"]
        client.execute("qmp_capabilities")
        return client

    def _read(self) -> dict[str, Any]:
        assert self.sock is not None
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                raise TransportError(f"QMP connection failed: {exc}") from exc
            if not chunk:
                raise TransportError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise TransportError(f"QMP sent invalid JSON: {line[:200]!r}") from exc
        if not isinstance(msg, dict):
            raise TransportError(f"QMP sent a non-object: {line[:200]!r}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; QMPError on an ``error`` reply."""
        if self.sock is None:
            raise TransportError("QMP client is not connected")
        self._id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        except OSError as exc:
            raise TransportError(f"QMP send of {command} failed: {exc}") from exc
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self._id:
                continue  # a late reply to an earlier command that timed out
            if "error" in reply:
                raise QMPError(command, arguments, reply)
            return reply.get("return")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
