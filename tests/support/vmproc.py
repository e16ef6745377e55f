"""``livemig vm`` processes for the tests: started, connected with qemu.qmp's QMPClient, paired
(source with a counter guest, destination with ``--incoming defer``) and migrated."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

GUEST = ["--guest", "portable", "--memory", "32M", "--fill", "random"]


def vm(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "livemig.cli", "vm", *args], **kw)


async def connect(path: Path, proc: subprocess.Popen[bytes]) -> QMPClient:
    client = QMPClient(path.name)
    deadline = time.monotonic() + 60
    while True:
        try:
            await client.connect(str(path))
            return client
        except ConnectError:
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the VM's QMP socket never answered"
            await asyncio.sleep(0.05)


async def until(client: QMPClient, name: str, status: str | None = None) -> list[dict[str, Any]]:
    """Events up to and including ``name`` (with data.status == status, or a final failed or
    cancelled); all of them returned."""
    seen = []
    while True:
        ev = await asyncio.wait_for(client.events.get(), 60)
        seen.append(dict(ev))
        if ev["event"] == name and (status is None or ev["data"]["status"] in (status, "failed", "cancelled")):
            return seen


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 120))


async def pair(tmp_path: Path, procs: list[subprocess.Popen[bytes]], *src_args: str,
               dst_args: tuple[str, ...] = ()) -> tuple[QMPClient, QMPClient]:
    procs.append(vm(*GUEST, "--workload", "counter", "--name", "src", *src_args,
                     "--qmp", f"unix:{tmp_path / 'src.sock'},server=on,wait=off"))
    procs.append(vm(*GUEST, "--incoming", "defer", "--name", "dst", *dst_args,
                     "--qmp", f"unix:{tmp_path / 'dst.sock'},server=on,wait=off"))
    src = await connect(tmp_path / "src.sock", procs[0])
    dst = await connect(tmp_path / "dst.sock", procs[1])
    return src, dst


async def migrate(src: QMPClient, dst: QMPClient, **params: Any) -> None:
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await c.execute("migrate-set-parameters", params)
    assert (await dst.execute("query-status"))["status"] == "inmigrate"
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    info: dict[str, Any] = await dst.execute("query-migrate")  # type: ignore[assignment]
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{info['socket-address'][0]['port']}"})
