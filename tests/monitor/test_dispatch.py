"""The QMP command layer without sockets: negotiation, request checks, argument schema, JSON stream."""

from __future__ import annotations

from typing import Any

import pytest

from livemig.monitor import CommandTable, QMPError, Session, event
from livemig.monitor.jsonstream import JSONStream, StreamError
from livemig.monitor.schema import BOOL, INT, STR, UINT8, Enum, ListOf, Member, struct

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"}


def _table(calls: list[Any]) -> CommandTable:
    t = CommandTable()
    caps = ListOf(struct(Member("capability", Enum(("multifd", "events"))), Member("state", BOOL)))
    t.add("set-caps", lambda a: calls.append(a), struct(Member("capabilities", caps)))
    t.add("migrate", lambda a: calls.append(a), struct(Member("uri", STR), Member("detach", BOOL, optional=True)))
    t.add("setp", lambda a: calls.append(a), struct(Member("multifd-channels", UINT8, optional=True),
                                                   Member("downtime-limit", INT, optional=True)))
    t.add("fail", lambda a: (_ for _ in ()).throw(QMPError("it failed")))
    t.add("answer", lambda a: {"x": 1})
    return t


@pytest.fixture
def session() -> tuple[Session, list[Any]]:
    calls: list[Any] = []
    return Session(_table(calls), VERSION), calls


def _negotiated(session: tuple[Session, list[Any]]) -> tuple[Session, list[Any]]:
    s, calls = session
    assert s.handle({"execute": "qmp_capabilities", "id": 0}) == {"return": {}, "id": 0}
    return s, calls


def test_greeting_and_negotiation(session: tuple[Session, list[Any]]) -> None:
    s, calls = session
    assert s.greeting() == {"QMP": {"version": VERSION, "capabilities": []}}
    r = s.handle({"execute": "answer", "id": "a"})
    assert r == {"error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": "a"}
    r = s.handle({"execute": "nonexistent"})
    assert r["error"]["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'"
    r = s.handle({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert r == {"error": {"class": "GenericError", "desc": "Capability oob not available"}}
    assert not s.negotiated
    assert s.handle({"execute": "qmp_capabilities", "arguments": {}, "id": [1, 2]}) == {"return": {}, "id": [1, 2]}
    r = s.handle({"execute": "qmp_capabilities"})
    assert r["error"] == {"class": "CommandNotFound",
                          "desc": "Capabilities negotiation is already complete, command ignored"}
    assert s.handle({"execute": "answer", "id": {"k": None}}) == {"return": {"x": 1}, "id": {"k": None}}
    assert calls == []


@pytest.mark.parametrize("message, desc, has_id", [
    ([1, 2], "QMP input must be a JSON object", False),
    ("text", "QMP input must be a JSON object", False),
    ({"id": 5}, "QMP input lacks member 'execute'", True),
    ({"execute": 3, "id": 5}, "QMP input member 'execute' must be a string", True),
    ({"execute": "answer", "arguments": [], "id": 5}, "QMP input member 'arguments' must be an object", True),
    ({"execute": "answer", "extra": 1, "id": 5}, "QMP input member 'extra' is unexpected", True),
    ({"exec-oob": "answer", "id": 5}, "QMP input member 'exec-oob' is unexpected", True),
])
def test_malformed_requests(session: tuple[Session, list[Any]], message: Any, desc: str, has_id: bool) -> None:
    s, _ = _negotiated(session)
    r = s.handle(message)
    assert r["error"] == {"class": "GenericError", "desc": desc}
    assert ("id" in r) is has_id


def test_unknown_command_and_handler_error(session: tuple[Session, list[Any]]) -> None:
    s, _ = _negotiated(session)
    assert s.handle({"execute": "migrat", "id": 1}) == {
        "error": {"class": "CommandNotFound", "desc": "The command migrat has not been found"}, "id": 1}
    assert s.handle({"execute": "fail"}) == {"error": {"class": "GenericError", "desc": "it failed"}}


@pytest.mark.parametrize("name, arguments, desc", [
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": 5}, "Invalid parameter type for 'uri', expected: string"),
    ("migrate", {"uri": "tcp:x:1", "detach": "yes"}, "Invalid parameter type for 'detach', expected: boolean"),
    ("migrate", {"uri": "tcp:x:1", "blk": True}, "Parameter 'blk' is unexpected"),
    ("setp", {"multifd-channels": 256}, "Parameter 'multifd-channels' expects uint8_t"),
    ("setp", {"multifd-channels": True}, "Invalid parameter type for 'multifd-channels', expected: integer"),
    ("setp", {"downtime-limit": 1.5}, "Invalid parameter type for 'downtime-limit', expected: integer"),
    ("set-caps", {"capabilities": {}}, "Invalid parameter type for 'capabilities', expected: array"),
    ("set-caps", {"capabilities": [{"capability": "nope", "state": True}]},
     "Parameter 'capability' does not accept value 'nope'"),
    ("set-caps", {"capabilities": [{"capability": "multifd", "state": 1}]},
     "Invalid parameter type for 'capabilities[0].state', expected: boolean"),
    ("set-caps", {"capabilities": [{"capability": "multifd"}]}, "Parameter 'capabilities[0].state' is missing"),
    ("set-caps", {"capabilities": [{"capability": "multifd", "state": True, "x": 1}]},
     "Parameter 'capabilities[0].x' is unexpected"),
])
def test_argument_errors_have_no_side_effect(session: tuple[Session, list[Any]], name: str,
                                             arguments: dict[str, Any], desc: str) -> None:
    s, calls = _negotiated(session)
    r = s.handle({"execute": name, "arguments": arguments, "id": "x"})
    assert r == {"error": {"class": "GenericError", "desc": desc}, "id": "x"}
    assert calls == []


def test_good_arguments_reach_the_handler(session: tuple[Session, list[Any]]) -> None:
    s, calls = _negotiated(session)
    caps = [{"capability": "events", "state": True}]
    assert s.handle({"execute": "set-caps", "arguments": {"capabilities": caps}}) == {"return": {}}
    assert calls == [{"capabilities": caps}]


def test_table_execute_is_the_hmp_path() -> None:
    calls: list[Any] = []
    t = _table(calls)
    assert t.execute("answer") == {"x": 1}
    with pytest.raises(QMPError, match="Parameter 'uri' is missing"):
        t.execute("migrate", {})
    with pytest.raises(QMPError) as info:
        t.execute("qmp_capabilities")
    assert info.value.cls == "CommandNotFound"


def test_event_shape() -> None:
    e = event("MIGRATION", {"status": "active"})
    assert e["event"] == "MIGRATION" and e["data"] == {"status": "active"}
    assert set(e["timestamp"]) == {"seconds", "microseconds"}
    assert 0 <= e["timestamp"]["microseconds"] < 1_000_000 and e["timestamp"]["seconds"] > 1_600_000_000
    assert "data" not in event("STOP")


def test_stream_frames_without_newlines_and_recovers() -> None:
    s = JSONStream(max_size=200, max_depth=4)
    out = s.feed(b'{"execute": "a"}{"execute":')
    assert out == [{"execute": "a"}]
    out = s.feed(b' "b"}\r\n{"execute": }  {\'execute\': \'it\\\'s "q"\'} ] \x04 {"ok": 1}')
    assert out == [{"execute": "b"}, StreamError("JSON parse error, expecting value"), {"execute": 'it\'s "q"'},
                   StreamError("JSON parse error, stray ']'"), StreamError("JSON parse error, stray '\\x04'"),
                   {"ok": 1}]
    # oversized: one error, whether it arrives at once or in pieces; the next message is fine
    assert s.feed(b'{"a": "' + b"x" * 300 + b'"} {"ok": 2}') == [
        StreamError("JSON token size limit exceeded"), {"ok": 2}]
    assert s.feed(b'{"a": "' + b"x" * 300) == [StreamError("JSON token size limit exceeded")]
    assert s.feed(b"x" * 300 + b'"}{"ok": 3}') == [{"ok": 3}]
    assert s.feed(b"[[[[[[1]]]]]] 7 {}") == [StreamError("JSON nesting depth limit exceeded"), 7, {}]
    assert s.feed(b'{"s": "\xff"}') == [StreamError("JSON parse error, invalid UTF-8 sequence in string")]
