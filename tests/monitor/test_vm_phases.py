"""``migrate_cancel`` in each phase of a migration between ``livemig vm`` processes (qemu.qmp's
QMPClient), with both sides' final states; pause-before-switchover with the guest stopped, as QEMU;
a ``-S`` destination that never runs its guest before ``cont``; a ``wait=on`` monitor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from support.vmproc import GUEST, connect, pair, run, until, vm

pytestmark = pytest.mark.slow
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

SLOW = {"max-bandwidth": 1 << 20}  # 32 MiB at 1 MiB/s: active for many seconds


async def _incoming(src: QMPClient, dst: QMPClient, *, pause: bool = False, **params: Any) -> str:
    """Capabilities (events, and pause-before-switchover on the source) and parameters on both; the
    destination listening (exit-on-error false, so its failure can be asked); the URI."""
    for c in (src, dst):
        caps = [{"capability": "events", "state": True}]
        if pause and c is src:
            caps.append({"capability": "pause-before-switchover", "state": True})
        await c.execute("migrate-set-capabilities", {"capabilities": caps})
        if params:
            await c.execute("migrate-set-parameters", params)
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    info: dict[str, Any] = await dst.execute("query-migrate")  # type: ignore[assignment]
    return f"tcp:127.0.0.1:{info['socket-address'][0]['port']}"


async def _progress(c: QMPClient) -> int:
    w: dict[str, Any] = await c.execute("x-query-workload")  # type: ignore[assignment]
    return int(w["progress"])


async def _runs(c: QMPClient) -> bool:
    """The guest's progress counter moves (it runs)."""
    before = await _progress(c)
    await asyncio.sleep(0.3)
    return await _progress(c) > before


async def _source_runs_again(src: QMPClient) -> None:
    info: dict[str, Any] = await src.execute("query-migrate")  # type: ignore[assignment]
    assert info["status"] == "cancelled" and info["livemig"]["source-guest"] == "running", info
    assert await src.execute("query-status") == {"status": "running", "running": True}
    assert await _runs(src)


async def _destination_discarded(dst: QMPClient) -> None:
    for _ in range(600):
        info: dict[str, Any] = await dst.execute("query-migrate")  # type: ignore[assignment]
        if info.get("status") == "failed":
            break
        await asyncio.sleep(0.05)
    assert info["status"] == "failed" and info.get("error-desc"), info
    assert await dst.execute("query-status") == {"status": "inmigrate", "running": False}


async def _close(*clients: QMPClient) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            await c.execute("quit")
        with contextlib.suppress(Exception):
            await c.disconnect()


def test_cancel_in_setup(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A destination that accepts and never answers keeps the source in setup: cancelled there, the
    source runs on and the destination's connection is closed."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]

    async def main() -> None:
        procs.append(vm(*GUEST, "--workload", "counter", "--qmp", f"unix:{tmp_path / 'src.sock'},server=on,wait=off"))
        src = await connect(tmp_path / "src.sock", procs[0])
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        conn, _ = await asyncio.to_thread(silent.accept)
        await until(src, "MIGRATION", "setup")
        assert (await src.execute("query-migrate"))["status"] == "setup"  # type: ignore[index]
        await src.execute("migrate_cancel")
        events = await until(src, "MIGRATION", "cancelled")
        assert events[-1]["data"]["status"] == "cancelled"
        await _source_runs_again(src)
        conn.settimeout(30)
        while await asyncio.to_thread(conn.recv, 65536):
            pass  # the source closed its end: the destination side sees EOF
        conn.close()
        await _close(src)
    try:
        run(main)
    finally:
        silent.close()


def test_cancel_in_active_ram_passes(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    async def main() -> None:
        src, dst = await pair(tmp_path, procs)
        uri = await _incoming(src, dst, **SLOW)
        await src.execute("migrate", {"uri": uri})
        await until(src, "MIGRATION_PASS")
        info: dict[str, Any] = await src.execute("query-migrate")  # type: ignore[assignment]
        assert info["status"] == "active" and 0 < info["ram"]["transferred"] < info["ram"]["total"]
        await src.execute("migrate_cancel")
        statuses = [e["data"]["status"] for e in await until(src, "MIGRATION", "cancelled")
                    if e["event"] == "MIGRATION"]
        assert statuses[-2:] == ["cancelling", "cancelled"]
        await _source_runs_again(src)
        await _destination_discarded(dst)
        await _close(src, dst)
    run(main)


def test_pre_switchover_stops_the_guest_then_cancel(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """As QEMU's migration_completion: STOP (finish-migrate) comes before MIGRATION pre-switchover,
    and the guest stays stopped while waiting; migrate_cancel there runs it again on the source."""
    async def main() -> None:
        src, dst = await pair(tmp_path, procs)
        uri = await _incoming(src, dst, pause=True, **{"max-bandwidth": 0})
        await src.execute("migrate", {"uri": uri})
        events = await until(src, "MIGRATION", "pre-switchover")
        names = [e["event"] if e["event"] != "MIGRATION" else e["data"]["status"] for e in events]
        assert names.index("STOP") < names.index("pre-switchover"), names
        assert await src.execute("query-status") == {"status": "finish-migrate", "running": False}
        assert (await src.execute("query-migrate"))["status"] == "pre-switchover"  # type: ignore[index]
        assert not await _runs(src)
        await src.execute("migrate_cancel")
        await until(src, "MIGRATION", "cancelled")
        await until(src, "RESUME")
        await _source_runs_again(src)
        await _destination_discarded(dst)
        await _close(src, dst)
    run(main)


def test_cancel_at_device_leaves_exactly_one_guest_running(tmp_path: Path,
                                                         procs: list[subprocess.Popen[bytes]]) -> None:
    """migrate_cancel right after migrate-continue (device phase): before the commit it cancels (the
    source runs, the destination discards), after it it is too late (the destination runs, the source
    stays in postmigrate); never both, never neither."""
    async def main() -> None:
        src, dst = await pair(tmp_path, procs)
        uri = await _incoming(src, dst, pause=True, **{"max-bandwidth": 0})
        await src.execute("migrate", {"uri": uri})
        await until(src, "MIGRATION", "pre-switchover")
        await src.execute("migrate-continue", {"state": "pre-switchover"})
        await src.execute("migrate_cancel")
        final = (await until(src, "MIGRATION", "completed"))[-1]["data"]["status"]
        if final == "completed":
            await until(dst, "RESUME")
            assert (await src.execute("query-status"))["status"] == "postmigrate"  # type: ignore[index]
            assert await dst.execute("query-status") == {"status": "running", "running": True}
            assert await _runs(dst)
        else:
            await _source_runs_again(src)
            await _destination_discarded(dst)
        await _close(src, dst)
    run(main)


def test_a_paused_destination_never_runs_before_cont(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    async def main() -> None:
        src, dst = await pair(tmp_path, procs, dst_args=("-S",))
        uri = await _incoming(src, dst, **{"max-bandwidth": 0})
        await src.execute("migrate", {"uri": uri})
        await until(src, "MIGRATION", "completed")
        await until(dst, "MIGRATION", "completed")
        assert await dst.execute("query-status") == {"status": "paused", "running": False}
        info: dict[str, Any] = await src.execute("query-migrate")  # type: ignore[assignment]
        at_handover = info["livemig"]["destination"]["progress_at_resume"]
        assert await _progress(dst) == at_handover and not await _runs(dst)  # not one step ran
        await dst.execute("cont")
        await until(dst, "RESUME")
        assert await dst.execute("query-status") == {"status": "running", "running": True}
        assert await _runs(dst)
        await _close(src, dst)
    run(main)


def test_wait_on_holds_the_guest_until_a_client_connects(tmp_path: Path,
                                                        procs: list[subprocess.Popen[bytes]]) -> None:
    sock = tmp_path / "q.sock"
    proc = vm(*GUEST, "--workload", "counter", "--qmp", f"unix:{sock},server=on")  # wait=on: QEMU's default
    procs.append(proc)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert line == f"livemig vm: waiting for a connection on unix:{sock} (wait=on)\n"

    async def main() -> None:
        client = await connect(sock, proc)
        assert await client.execute("query-status") == {"status": "running", "running": True}
        assert await _runs(client)
        await _close(client)
    run(main)
