"""``livemig vm --incoming file:PATH`` and ``migrate-incoming file:PATH``: a livemig mapped-ram
snapshot restored into the VM's guest, which then carries on (or waits for ``cont`` with -S)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from support.vmproc import connect, run, until, vm

GUEST = ["--guest", "portable", "--memory", "16M", "--workload", "counter"]


def save(tmp_path: Path) -> Path:
    snap = tmp_path / "snap.bin"
    r = subprocess.run([sys.executable, "-m", "livemig.cli", "migrate", f"file:{snap}", "--mapped-ram", *GUEST,
                        "--run-before", "0.3", "--max-bandwidth", "0", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return snap


def test_incoming_file_restores_and_runs(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    snap = save(tmp_path)
    sock = tmp_path / "q.sock"
    procs.append(vm(*GUEST, "--incoming", "defer", "--qmp", f"unix:{sock},server=on,wait=off"))

    async def go() -> None:
        c = await connect(sock, procs[0])
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await c.execute("migrate-incoming", {"uri": f"file:{snap}"})
        seen = await until(c, "MIGRATION", "completed")
        assert seen[-1]["data"]["status"] == "completed", seen
        assert "RESUME" in [e["event"] for e in seen]
        assert (await c.execute("query-status"))["status"] == "running"
        first = await c.execute("x-query-workload")
        assert first["check"] == "ok"  # type: ignore[index]
        await c.execute("quit")

    run(go)


def test_incoming_file_with_S_waits_for_cont(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    snap = save(tmp_path)
    sock = tmp_path / "q.sock"
    procs.append(vm(*GUEST, "-S", "--incoming", f"file:{snap}", "--qmp", f"unix:{sock},server=on,wait=off"))

    async def go() -> None:
        c = await connect(sock, procs[0])
        for _ in range(600):
            if (await c.execute("query-migrate")).get("status") == "completed":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert (await c.execute("query-status"))["status"] == "paused"
        await c.execute("cont")
        assert (await c.execute("query-status"))["status"] == "running"
        await c.execute("quit")

    run(go)


def test_incoming_file_refuses_a_damaged_file(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a migration file" * 10)
    sock = tmp_path / "q.sock"
    procs.append(vm(*GUEST, "--incoming", "defer", "--qmp", f"unix:{sock},server=on,wait=off"))

    async def go() -> None:
        c = await connect(sock, procs[0])
        await c.execute("migrate-incoming", {"uri": f"file:{bad}", "exit-on-error": False})
        for _ in range(600):
            info = await c.execute("query-migrate")
            if info.get("status") == "failed":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert "migration file" in info["error-desc"], info  # type: ignore[index]
        assert (await c.execute("query-status"))["status"] == "inmigrate"
        await c.execute("quit")

    run(go)
