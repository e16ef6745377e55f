"""The QMP server over real sockets, driven by qemu.qmp's QMPClient (QEMU's own client) and raw bytes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from livemig.monitor import CommandTable, version_info
from livemig.monitor.schema import STR, Member, struct
from livemig.monitor.server import QMPServer

Raw = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Slow:
    """A command that blocks until released, to disconnect a client mid-command."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, _args: dict[str, Any]) -> Any:
        self.started.set()
        self.release.wait(10)
        self.finished.set()
        return {"done": True}


def _server(slow: Slow, max_size: int = 1 << 20) -> QMPServer:
    table = CommandTable()
    table.add("echo", lambda a: {"text": a["text"]}, struct(Member("text", STR)))
    table.add("slow", slow)
    server = QMPServer(table, version_info(), max_size=max_size)
    table.add("emit", lambda a: server.emit("TEST_EVENT", {"text": a["text"]}), struct(Member("text", STR)))
    return server


def _run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 30))


async def _raw(path: str) -> tuple[Raw, dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(path)
    greeting = json.loads(await reader.readline())
    return (reader, writer), greeting


async def _ask(raw: Raw, data: bytes) -> dict[str, Any]:
    raw[1].write(data)
    line = await raw[0].readline()
    assert line.endswith(b"\r\n")
    answer: dict[str, Any] = json.loads(line)
    return answer


def test_qmpclient_two_clients_events_and_tcp(tmp_path: Path) -> None:
    async def main() -> None:
        server = _server(Slow())
        path = str(tmp_path / "qmp.sock")
        await server.listen_unix(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        port, _ = await server.listen_tcp("127.0.0.1", 0)
        a, b = QMPClient("a"), QMPClient("b")
        await a.connect(path)
        await b.connect(("127.0.0.1", port))
        assert a.greeting is not None and a.greeting.QMP.version["package"].startswith("livemig-")
        assert await a.execute("echo", {"text": "hi"}) == {"text": "hi"}
        with pytest.raises(ExecuteError) as info:
            await b.execute("echo", {"text": 1})
        assert info.value.error_class == "GenericError"
        assert "Invalid parameter type for 'text', expected: string" in str(info.value)
        with pytest.raises(ExecuteError) as info:
            await b.execute("nonsense")
        assert info.value.error_class == "CommandNotFound"
        await b.execute("emit", {"text": "to all"})
        for client in (a, b):
            ev = await asyncio.wait_for(client.events.get(), 5)
            assert ev["event"] == "TEST_EVENT" and ev["data"] == {"text": "to all"}
            assert isinstance(ev["timestamp"]["seconds"], int)
        await a.disconnect()
        await b.disconnect()
        await server.close()
    _run(main)


def test_raw_protocol_errors_keep_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        server = _server(Slow(), max_size=4096)
        path = str(tmp_path / "qmp.sock")
        await server.listen_unix(path)
        raw, greeting = await _raw(path)
        assert greeting == {"QMP": {"version": version_info(), "capabilities": []}}
        r = await _ask(raw, b'{"execute": "echo", "arguments": {"text": "x"}, "id": 1}')
        assert r == {"error": {"class": "CommandNotFound",
                               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
        # an event sent before negotiation is not delivered
        other, _ = await _raw(path)
        await _ask(other, b'{"execute": "qmp_capabilities"}')
        assert (await _ask(other, b'{"execute": "emit", "arguments": {"text": "e"}}'))["event"] == "TEST_EVENT"
        assert await _ask(raw, b'{"execute": "qmp_capabilities", "id": "n"}') == {"return": {}, "id": "n"}
        r = await _ask(raw, b'{"execute": }')
        assert r == {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}
        r = await _ask(raw, b'{"execute": "echo", "arguments": {"text": "' + b"y" * 5000 + b'"}}')
        assert r == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
        r = await _ask(raw, b"{'execute': 'echo', 'arguments': {'text': 'single'}, 'id': 2}")
        assert r == {"return": {"text": "single"}, "id": 2}
        r = await _ask(raw, b'{"execute": "nope", "id": 3}')
        assert r["error"]["class"] == "CommandNotFound" and r["id"] == 3
        raw[1].close()
        other[1].close()
        await server.close()
    _run(main)


def test_disconnect_mid_command(tmp_path: Path) -> None:
    async def main() -> None:
        slow = Slow()
        server = _server(slow)
        path = str(tmp_path / "qmp.sock")
        await server.listen_unix(path)
        raw, _ = await _raw(path)
        await _ask(raw, b'{"execute": "qmp_capabilities"}')
        raw[1].write(b'{"execute": "slow"}')
        await asyncio.to_thread(slow.started.wait, 5)
        raw[1].close()  # gone while the command runs
        await asyncio.sleep(0.05)
        slow.release.set()
        await asyncio.to_thread(slow.finished.wait, 5)
        assert slow.finished.is_set()
        client = QMPClient("after")
        await client.connect(path)
        assert await client.execute("echo", {"text": "still here"}) == {"text": "still here"}
        await client.disconnect()
        await server.close()
    _run(main)
