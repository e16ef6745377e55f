"""Interactive HMP monitors: a ``(qemu) `` prompt on stdio or on unix socket connections.

Each command line runs under the QMP server's lock (one command at a time across every monitor);
``migrate`` without ``-d`` keeps this prompt waiting until the migration ends, as QEMU's
hmp_migrate does, while the other monitors stay live. Output lines end in CRLF, as QEMU's
monitor_puts writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Awaitable, Callable

from .hmp import HMP, MIGRATION_RUNNING
from .server import noting, remove_socket_files, unix_listener

PROMPT = "(qemu) "

ReadLine = Callable[[], Awaitable[str | None]]
Write = Callable[[str], None]


class HMPMonitors:
    """Every interactive HMP monitor of one process; ``lock`` is the QMP server's command lock."""

    def __init__(self, hmp: HMP, lock: asyncio.Lock, banner: str) -> None:
        self.hmp = hmp
        self.lock = lock
        self.banner = banner
        self._servers: list[asyncio.Server] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._paths: list[str] = []

    async def session(self, read_line: ReadLine, write: Write) -> None:
        """Banner, then prompt, line, output... until end of input."""
        write(f"{self.banner}\n{PROMPT}")
        while (line := await read_line()) is not None:
            async with self.lock:
                result = await asyncio.to_thread(self.hmp.run, line)
                write(result.output)
            if result.wait:
                await self._wait_migration(write)
            write(PROMPT)

    async def _wait_migration(self, write: Write) -> None:
        while True:
            await asyncio.sleep(0.1)
            status, error = await asyncio.to_thread(self.hmp.migration_status)
            if status not in MIGRATION_RUNNING:
                if error:
                    write(f"{error}\n")
                return

    def start_stdio(self) -> None:
        """Serve stdin/stdout (a thread reads stdin, so the event loop never blocks on it)."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def reader() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=reader, name="hmp-stdin", daemon=True).start()

        def write(text: str) -> None:
            with contextlib.suppress(OSError):
                os.write(sys.stdout.fileno(), text.replace("\n", "\r\n").encode())

        self._tasks.append(asyncio.create_task(self.session(lines.get, write)))

    async def listen_unix(self, path: str) -> asyncio.Event:
        """Serve HMP sessions on a new unix socket at ``path`` (removed again by :meth:`close`); the
        returned event is set once a first client connected."""
        first = asyncio.Event()
        self._servers.append(await asyncio.start_unix_server(noting(first, self._serve_socket),
                                                             sock=unix_listener(path)))
        self._paths.append(path)
        return first

    async def _serve_socket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.append(task)

        async def read_line() -> str | None:
            data = await reader.readline()
            return data.decode("utf-8", "replace") if data else None

        def write(text: str) -> None:
            if not writer.is_closing():
                writer.write(text.replace("\n", "\r\n").encode())

        try:
            await self.session(read_line, write)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # shutdown: ending normally keeps asyncio's stream callback from printing a traceback
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening, remove the socket files, end every session (queued output is flushed)."""
        for server in self._servers:
            server.close()
        remove_socket_files(self._paths)
        for writer in self._writers:
            writer.close()
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
