"""QMP's command layer, apart from any transport: the command table and one client's session.

A :class:`CommandTable` maps command names to handlers with typed arguments
(:mod:`livemig.monitor.schema`). A :class:`Session` is one monitor connection's protocol state
(capabilities negotiation) and turns each incoming JSON value into the response QEMU would send,
after the checks of QEMU's ``qapi/qmp-dispatch.c`` and ``monitor/qmp.c``, in their order and words:

- not an object: ``QMP input must be a JSON object`` (no ``id``)
- ``execute`` missing, not a string, clashing with ``exec-oob``, unknown members, ``arguments`` not
  an object: ``QMP input lacks member 'execute'`` and the like (GenericError, ``id`` echoed)
- before ``qmp_capabilities``: CommandNotFound ``Expecting capabilities negotiation with
  'qmp_capabilities'``; after it, ``qmp_capabilities`` again: CommandNotFound ``Capabilities
  negotiation is already complete, command ignored``
- unknown command: CommandNotFound ``The command NAME has not been found``
- argument errors from the schema, raised before the handler runs (no side effect)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .jsonstream import StreamError
from .schema import NO_ARGS, Enum, ListOf, Member, QMPError, Struct, check, struct

#: a command handler: checked arguments in, the value of "return" out (None -> {}); raises QMPError
Handler = Callable[[dict[str, Any]], Any]

CAPABILITIES_ARGS = struct(Member("enable", ListOf(Enum(("oob",))), optional=True))


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args: Struct = NO_ARGS
    help: str = ""


class CommandTable:
    """Command name -> :class:`Command`. ``execute`` is the in-process call HMP uses."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self.add("qmp_capabilities", _negotiated_elsewhere, CAPABILITIES_ARGS,
                 "enable QMP capabilities (first command of a session)")

    def add(self, name: str, handler: Handler, args: Struct = NO_ARGS, help: str = "") -> None:
        if name in self._commands and name != "qmp_capabilities":
            raise ValueError(f"command {name} registered twice")
        self._commands[name] = Command(name, handler, args, help)

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        return sorted(self._commands)

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command as a negotiated session would; returns its result or raises QMPError."""
        cmd = self._commands.get(name)
        if cmd is None or name == "qmp_capabilities":
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        result = cmd.handler(check(cmd.args, arguments or {}))
        return {} if result is None else result


def _negotiated_elsewhere(_args: dict[str, Any]) -> Any:
    raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")


def event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """An asynchronous event message: name, optional data, wall-clock timestamp (s, us)."""
    now = time.time()
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}
    return msg


def error_response(exc: QMPError, request: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = {"error": exc.to_qmp()}
    if request is not None and "id" in request:
        resp["id"] = request["id"]
    return resp


@dataclass
class Call:
    """A checked request, ready to run (the server runs it off the event loop)."""

    command: Command
    arguments: dict[str, Any]
    request: dict[str, Any]

    def run(self) -> dict[str, Any]:
        try:
            result = self.command.handler(self.arguments)
        except QMPError as exc:
            return error_response(exc, self.request)
        resp: dict[str, Any] = {"return": {} if result is None else result}
        if "id" in self.request:
            resp["id"] = self.request["id"]
        return resp


class Session:
    """One QMP client: negotiation state and request checking. Events go only to negotiated sessions."""

    def __init__(self, table: CommandTable, version: dict[str, Any]) -> None:
        self.table = table
        self.version = version
        self.negotiated = False

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version, "capabilities": []}}

    def prepare(self, message: Any) -> Call | dict[str, Any]:
        """A :class:`Call` to run, or the response already (an error, or qmp_capabilities' answer)."""
        if isinstance(message, StreamError):
            return error_response(QMPError(message.desc))
        if not isinstance(message, dict):
            return error_response(QMPError("QMP input must be a JSON object"))
        try:
            name = _check_request(message)
            cmd = self.table.get(name)
            if not self.negotiated and name != "qmp_capabilities":
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            if cmd is None:
                raise QMPError(f"The command {name} has not been found", "CommandNotFound")
            arguments = check(cmd.args, message.get("arguments", {}))
            if name == "qmp_capabilities":
                return self._negotiate(arguments, message)
        except QMPError as exc:
            return error_response(exc, message)
        return Call(cmd, arguments, message)

    def _negotiate(self, arguments: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
        if self.negotiated:
            _negotiated_elsewhere(arguments)
        for cap in arguments.get("enable", []):
            raise QMPError(f"Capability {cap} not available")
        self.negotiated = True
        resp: dict[str, Any] = {"return": {}}
        if "id" in message:
            resp["id"] = message["id"]
        return resp

    def handle(self, message: Any) -> dict[str, Any]:
        """prepare + run, in the caller's thread (tests, simple transports)."""
        prepared = self.prepare(message)
        return prepared.run() if isinstance(prepared, Call) else prepared


def _check_request(message: dict[str, Any]) -> str:
    """The command name of a well-formed request; QMPError in qmp_dispatch_check_obj's words."""
    exec_key = None
    for key, value in message.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
            if exec_key:
                raise QMPError(f"QMP input member '{key}' clashes with '{exec_key}'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            # exec-oob too: this server does not offer the oob capability
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise QMPError("QMP input lacks member 'execute'")
    name: str = message[exec_key]
    return name

