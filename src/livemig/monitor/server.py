"""The QMP server: asyncio listeners on unix sockets (mode 0600) and TCP, any number of clients.

Transport only: each connection gets a :class:`~livemig.monitor.dispatch.Session`; bytes go through
a :class:`~livemig.monitor.jsonstream.JSONStream`; each command runs in a worker thread while the
server's :attr:`QMPServer.lock` is held, so commands of all monitors run one at a time (as under
QEMU's big lock) and the event loop keeps serving other clients and events meanwhile. Output is
one JSON object per line, CRLF-terminated (QMP spec). A client that disconnects mid-command does
not stop the command; its answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .dispatch import Call, CommandTable, Session, event
from .jsonstream import MAX_TOKEN_SIZE, JSONStream


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=True).encode() + b"\r\n"


def unix_listener(path: str) -> socket.socket:
    """A listening unix socket at ``path`` created with mode 0600 (a stale socket file is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if not os.path.isdir(path):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def remove_socket_files(paths: list[str]) -> None:
    """Unlink the unix sockets a process listened on (already gone: fine); empties ``paths``."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    paths.clear()


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def noting(first: asyncio.Event, serve: Serve) -> Serve:
    """``serve``, setting ``first`` when a connection arrives (for ``wait=on``)."""
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first.set()
        await serve(reader, writer)
    return run


class _Client:
    def __init__(self, session: Session, writer: asyncio.StreamWriter) -> None:
        self.session = session
        self.writer = writer

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))


class QMPServer:
    """Serves ``table`` to every client of every listener; :meth:`emit` sends events to all of them.

    ``on_command_done`` (optional) runs in the loop after each command's answer is queued: the VM
    process uses it to act on ``quit`` only once its answer is on its way.
    """

    def __init__(self, table: CommandTable, version: dict[str, Any], *, max_size: int = MAX_TOKEN_SIZE,
                 on_command_done: Callable[[], None] | None = None) -> None:
        self.table = table
        self.version = version
        self.max_size = max_size
        self.on_command_done = on_command_done
        self.lock = asyncio.Lock()
        self.clients: set[_Client] = set()
        self._servers: list[asyncio.Server] = []
        self._paths: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- listeners -------------------------------------------------------------------------------
    async def listen_unix(self, path: str) -> asyncio.Event:
        """Listen at ``path``; the returned event is set once a first client connected there."""
        self._loop = asyncio.get_running_loop()
        first = asyncio.Event()
        self._servers.append(await asyncio.start_unix_server(noting(first, self._serve), sock=unix_listener(path)))
        self._paths.append(path)
        return first

    async def listen_tcp(self, host: str, port: int) -> tuple[int, asyncio.Event]:
        """Listen on host:port (0 = any free port); the port, and an event set once a first client
        connected there."""
        self._loop = asyncio.get_running_loop()
        first = asyncio.Event()
        server = await asyncio.start_server(noting(first, self._serve), host, port, reuse_address=True)
        self._servers.append(server)
        port_: int = server.sockets[0].getsockname()[1]
        return port_, first

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one already-connected client (used by the listeners; public for other transports)."""
        self._loop = asyncio.get_running_loop()
        await self._serve(reader, writer)

    # --- events ----------------------------------------------------------------------------------
    def broadcast(self, message: dict[str, Any]) -> None:
        """Send an event to every negotiated client (event loop thread only)."""
        for client in list(self.clients):
            if client.session.negotiated:
                client.send(message)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Timestamp an event now and send it to every negotiated client; callable from any thread."""
        message = event(name, data)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.broadcast(message)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile: nobody to tell
                loop.call_soon_threadsafe(self.broadcast, message)

    # --- shutdown --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop listening, remove the unix socket files, close every connection (queued output is
        flushed first)."""
        for server in self._servers:
            server.close()
        remove_socket_files(self._paths)
        for client in list(self.clients):
            client.writer.close()
        for client in list(self.clients):
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait_for(client.writer.wait_closed(), 2.0)
        self._servers.clear()

    # --- one client ------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(Session(self.table, self.version), writer)
        self.clients.add(client)
        stream = JSONStream(self.max_size)
        try:
            client.send(client.session.greeting())
            while data := await reader.read(1 << 16):
                for message in stream.feed(data):
                    prepared = client.session.prepare(message)
                    if isinstance(prepared, Call):
                        async with self.lock:
                            response = await asyncio.to_thread(prepared.run)
                            client.send(response)
                        if self.on_command_done is not None:
                            self.on_command_done()
                    else:
                        client.send(prepared)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away; nothing else changes
        finally:
            self.clients.discard(client)
            writer.close()
