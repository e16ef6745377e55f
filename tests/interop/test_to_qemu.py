"""livemig's source into a real QEMU destination (``livemig migrate --peer qemu``): RAM lands
byte-exact for every method each QEMU has, a wrong size is refused before anything moves, and a QEMU
that dies mid-migration leaves livemig's guest running. The QEMU facts are checked without QEMU too
(``info ramblock`` parsing, the sync mode, the zero-page lists, the option checks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from livemig.errors import Cancelled, MigrationError, ParameterError
from livemig.guest import GuestConfig
from livemig.migration.qemu_qmp import QemuDestination, await_incoming, check_fit, machine_name, parse_ramblocks
from livemig.migration.to_qemu import QemuHandover
from livemig.params import MigrationParameters
from support.fakeguest import FakeGuest
from support.migrate import cli
from support.qemu import DEFAULT_MEMORY, Qemu, QemuBinary, qemu_or_skip

INFO_RAMBLOCK_72 = """\
              Block Name    PSize              Offset               Used              Total
                    ram0    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000
    /rom@etc/acpi/tables    4 KiB  0x0000000010080000 0x0000000000020000 0x0000000000200000
                 pc.bios    4 KiB  0x0000000010000000 0x0000000000010000 0x0000000000010000
"""
INFO_RAMBLOCK_100 = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000 0x00007f1433e00000  rw
      /rom@etc/acpi/rsdp    4 KiB  0x00000000102c0000 0x0000000000001000 0x0000000000001000 0x00007f144ac00000  ro
"""


def _dest(version: tuple[int, int, int], machine: str) -> QemuDestination:
    return QemuDestination(version, machine, (("pc.bios", 1 << 16), ("ram0", DEFAULT_MEMORY)), bytes(16))


# --- without QEMU ----------------------------------------------------------------------------------
def test_info_ramblock_of_both_versions() -> None:
    assert parse_ramblocks(INFO_RAMBLOCK_72) == [("ram0", 1 << 28), ("/rom@etc/acpi/tables", 0x20000),
                                                 ("pc.bios", 0x10000)]
    assert parse_ramblocks(INFO_RAMBLOCK_100) == [("pc.ram", 1 << 28), ("/rom@etc/acpi/rsdp", 0x1000)]
    with pytest.raises(MigrationError, match="lists no RAM block"):
        parse_ramblocks("unknown command: 'info ramblock'")


def test_sync_mode_and_zero_lists_follow_version_and_machine() -> None:
    assert machine_name("pc-q35-10.0-machine") == "pc-q35-10.0"
    assert _dest((7, 2, 22), "pc-q35-7.2").per_section_sync
    assert not _dest((10, 0, 13), "pc-q35-10.0").per_section_sync
    # a 10.0 QEMU running a 7.2 machine type has multifd-flush-after-each-section on
    assert _dest((10, 0, 13), "pc-q35-7.2").per_section_sync
    assert not _dest((10, 0, 13), "microvm").per_section_sync
    assert _dest((10, 0, 13), "pc-q35-7.2").reads_zero_lists
    assert not _dest((7, 2, 22), "pc-q35-7.2").reads_zero_lists
    assert _dest((10, 0, 13), "x").ram_block == ("ram0", DEFAULT_MEMORY)


def test_check_fit() -> None:
    params = MigrationParameters()
    with pytest.raises(ParameterError, match=r"--memory 128.00 MiB: the destination QEMU's largest RAM block 'ram0' "
                                             r"is 256.00 MiB \(268435456 bytes\)"):
        check_fit(_dest((10, 0, 13), "pc-q35-10.0"), 128 << 20, params, bytes(16))
    with pytest.raises(ParameterError, match="--uuid 01010101-.*the destination QEMU's UUID is 00000000-"):
        check_fit(_dest((10, 0, 13), "pc-q35-10.0"), DEFAULT_MEMORY, params, b"\1" * 16)
    assert check_fit(_dest((10, 0, 13), "pc-q35-10.0"), DEFAULT_MEMORY, params, bytes(16)) is params
    # QEMU 7.2 ignores zero-page lists: zero pages must travel as normal pages
    assert check_fit(_dest((7, 2, 22), "pc-q35-7.2"), DEFAULT_MEMORY, params, bytes(16)).zero_page_detection == "none"


@pytest.mark.parametrize(("args", "message"), [
    (["tcp:127.0.0.1:1", "--peer-qmp", "tcp:127.0.0.1:2"], "--peer-qmp tcp:127.0.0.1:2: needs --peer qemu"),
    (["tcp:127.0.0.1:1", "--peer", "qemu"], "--peer qemu needs --peer-qmp ADDRESS"),
    (["tcp:127.0.0.1:1", "--peer", "qemu", "--peer-qmp", "stdio"], "--peer-qmp stdio: expected tcp:HOST:PORT or"),
    (["--local", "--peer", "qemu", "--peer-qmp", "unix:/x"], "--peer qemu migrates to a running QEMU"),
    (["tcp:127.0.0.1:1", "--peer", "qemu", "--peer-qmp", "unix:/x", "--multifd-compression", "qpl"],
     "--multifd-compression qpl: not available with --peer qemu"),
])
def test_peer_options_refused(args: list[str], message: str) -> None:
    r = cli("migrate", "--memory", "4M", "--guest", "portable", *args, timeout=60)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert r.stderr.count("error:") == 1


def test_no_qmp_monitor_there() -> None:
    port = _free_port()
    r = cli("migrate", f"tcp:127.0.0.1:{_free_port()}", "--peer", "qemu", "--peer-qmp", f"tcp:127.0.0.1:{port}",
            "--memory", "4M", "--guest", "portable", "--timeout", "1", timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"--peer-qmp tcp:127.0.0.1:{port}: no QMP monitor answered within 1 s" in r.stderr


class _Monitor:
    """Answers query-migrate from a list: a dict, or an exception raised as QmpConnection raises it."""

    def __init__(self, *answers: dict[str, Any] | BaseException) -> None:
        self.answers = list(answers)

    def execute(self, command: str, arguments: Any = None, timeout: float = 30.0) -> Any:
        assert command == "query-migrate"
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise MigrationError(f"QMP {command} failed") from answer
        return answer


def test_await_incoming() -> None:
    assert await_incoming(_Monitor({"status": "active"}, {"status": "completed"}), 5)["status"] == "completed"
    assert await_incoming(_Monitor({"status": "failed", "error-desc": "x"}), 5)["error-desc"] == "x"
    # no answer in time: QEMU may still run the guest (outcome unknown), unlike a closed monitor
    with pytest.raises(TimeoutError, match="did not answer query-migrate within 5 s"):
        await_incoming(_Monitor(TimeoutError()), 5)
    with pytest.raises(MigrationError) as info:
        await_incoming(_Monitor(EOFError()), 5)
    assert not isinstance(info.value, TimeoutError)
    with pytest.raises(TimeoutError, match="still 'active' 0.05 s after the stream ended"):
        await_incoming(_Monitor(*[{"status": "active"}] * 100), 0.05)


def _handover(notes: list[str]) -> tuple[QemuHandover, FakeGuest]:
    guest = FakeGuest(GuestConfig(memory=4 << 20))
    guest.start()
    h = QemuHandover(guest, notes.append)
    h.switchover()
    assert not guest.running
    return h, guest


def test_handover_with_a_qemu_destination() -> None:
    """The stream's end is the commit point; QEMU's answer settles it; exactly one guest runs."""
    notes: list[str] = []
    h, guest = _handover(notes)
    h.stream_sent()
    assert h.guest_state == "postmigrate"
    assert h.cancel() is False  # QEMU has the whole stream: too late
    h.completed()
    assert (h.state, h.guest_state, guest.running) == ("completed", "postmigrate", False)
    # QEMU reported failed (or exited) after the whole stream: its guest cannot run, ours resumes
    h, guest = _handover(notes)
    h.stream_sent()
    h.destination_failed()
    assert (h.guest_state, guest.running) == ("running", True)
    # a cancel before the stream ended: nothing is committed, the guest resumes
    h, guest = _handover(notes)
    assert h.cancel() is True
    with pytest.raises(Cancelled):
        h.stream_sent()
    h.fail(Cancelled("migration cancelled"))
    assert (h.state, guest.running) == ("cancelled", True)


# --- with QEMU -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _destination(binary: QemuBinary, tmp_path: Path | None = None) -> tuple[Qemu, str]:
    """A QEMU waiting for a migration (``-S -incoming defer``) with a second QMP monitor for livemig
    (QEMU serves one client per monitor; the test holds the first): on TCP, or on a unix socket in
    ``tmp_path`` (a directory under /dev/shm, which QEMU 10's chroot shares)."""
    where = f"unix:{tmp_path / 'livemig-qmp.sock'}" if tmp_path else f"tcp:127.0.0.1:{_free_port()}"
    dst = Qemu(binary, incoming=True, extra=["-qmp", f"{where},server=on,wait=off"]).start()
    return dst, where


def _migrate(tmp_path: Path, qmp: str, *args: str,
             memory: int = DEFAULT_MEMORY) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "r.json"
    r = cli("migrate", f"tcp:127.0.0.1:{_free_port()}", "--peer", "qemu", "--peer-qmp", qmp,
            "--memory", str(memory), "--multifd-channels", "2", "--dump-ram", str(tmp_path / "dump"),
            "--json", str(out), "--quiet", *args)
    return r, json.loads(out.read_text()) if out.exists() else {}


METHODS = [("7.2", m) for m in ("none", "zlib", "zstd")] + [("10.0", m) for m in ("none", "zlib", "zstd")]
METHODS += [("qatzip", "qatzip-1"), ("qatzip", "qatzip-9")]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method"), METHODS)
def test_ram_lands_in_qemu(tmp_path: Path, kind: str, method: str) -> None:
    """A dirtying guest over several passes: QEMU's RAM equals livemig's at switchover, byte for byte."""
    binary = qemu_or_skip(kind)
    name, _, level = method.partition("-")
    extra = ["--multifd-qatzip-level", level] if level else []
    dst, qmp = _destination(binary)
    try:
        r, res = _migrate(tmp_path, qmp, "--multifd-compression", name, *extra, "--workload", "dirty",
                          "--dirty-rate", "3000", "--max-passes", "3", "--max-bandwidth", "0")
        assert r.returncode == 0, r.stdout + r.stderr + dst.log()
        assert res["status"] == "completed"
        assert res["livemig"]["source-guest"] == "postmigrate"  # the destination holds the RAM now
        d = res["destination"]
        assert d["qemu-version"].startswith(f"{binary.version[0]}.{binary.version[1]}.")
        assert (d["machine"], d["ram-block"]) == (binary.machine, "ram0")
        assert d["sync"] == ("per-section" if binary.version < (8, 0) else "multifd-flush")
        assert res["ram"]["dirty-sync-count"] >= 3
        # 7.2 reads no zero-page lists: every page went as a normal page
        assert (res["ram"]["duplicate"] == 0) == (binary.version < (9, 0))
        assert "only RAM crossed: its vCPUs start from reset" in r.stdout
        assert dst.wait_migration(timeout=10)["status"] == "completed"
        assert dst.execute("query-status")["status"] == "paused"  # -S: QEMU does not run it by itself
        params = dst.execute("query-migrate-parameters")
        assert (params["multifd-channels"], params["multifd-compression"]) == (2, name)
        src = (tmp_path / "dump" / "src-pc.ram.bin").read_bytes()
        assert len(src) == DEFAULT_MEMORY
        assert dst.read_ram() == src
    finally:
        dst.close()


@pytest.mark.slow
def test_size_mismatch_refused_before_anything_moves(tmp_path: Path) -> None:
    binary = qemu_or_skip("10.0")
    dst, qmp = _destination(binary)
    try:
        r, res = _migrate(tmp_path, qmp, "--guest", "portable", memory=128 << 20)
        assert r.returncode == 2, r.stderr
        assert ("--memory 128.00 MiB: the destination QEMU's largest RAM block 'ram0' is 256.00 MiB "
                "(268435456 bytes); livemig's guest RAM must be the same size") in r.stderr
        assert res == {}
        # nothing set, nothing listening: QEMU is as it was
        assert dst.execute("query-migrate") == {}
        caps = {c["capability"]: c["state"] for c in dst.execute("query-migrate-capabilities")}
        assert caps["multifd"] is False
        assert dst.execute("query-status")["status"] == "inmigrate"
    finally:
        dst.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["7.2", "10.0"])
def test_qemu_dying_mid_migration_leaves_source_running(tmp_path: Path, kind: str) -> None:
    binary = qemu_or_skip(kind)
    shm = Path(tempfile.mkdtemp(prefix="livemig-test-", dir="/dev/shm"))
    dst, qmp = _destination(binary, shm)
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig.cli", "migrate", f"tcp:127.0.0.1:{_free_port()}", "--peer", "qemu",
         "--peer-qmp", qmp, "--memory", str(DEFAULT_MEMORY), "--max-bandwidth", "16MiB/s", "--timeout", "5",
         "--json", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dst.wait_migration(("active",), timeout=60)
        time.sleep(1.0)  # some RAM is in QEMU, most is not
        assert dst.proc is not None
        dst.proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        dst.close()
        shutil.rmtree(shm, ignore_errors=True)
    assert proc.returncode == 1, err
    res = json.loads(out.read_text())
    assert res["status"] == "failed"
    assert res["livemig"]["source-guest"] == "running"
    assert res["livemig"]["handover"] == "failed"
    assert "the source guest is running" in err
    assert 0 < res["ram"]["transferred"] < DEFAULT_MEMORY


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["7.2", "10.0"])
def test_qemu_listening_already(tmp_path: Path, kind: str) -> None:
    """``-incoming tcp:...`` instead of ``defer``: QEMU 7.2 takes the multifd settings while it listens
    (the migration completes); QEMU 10 refuses the capability, and livemig says to use defer."""
    binary = qemu_or_skip(kind)
    port, qmp_port = _free_port(), _free_port()
    memory = 64 << 20
    dst = Qemu(binary, memory=memory, extra=["-S", "-incoming", f"tcp:127.0.0.1:{port}",
                                             "-qmp", f"tcp:127.0.0.1:{qmp_port},server=on,wait=off"]).start()
    try:
        out = tmp_path / "r.json"
        r = cli("migrate", f"tcp:127.0.0.1:{port}", "--peer", "qemu", "--peer-qmp", f"tcp:127.0.0.1:{qmp_port}",
                "--memory", str(memory), "--multifd-compression", "zstd", "--dump-ram", str(tmp_path / "dump"),
                "--json", str(out), "--quiet")
        if binary.version < (8, 0):
            assert r.returncode == 0, r.stderr + dst.log()
            assert dst.read_ram() == (tmp_path / "dump" / "src-pc.ram.bin").read_bytes()
        else:
            assert r.returncode == 1
            assert ("the destination QEMU refused the multifd settings (start QEMU with -incoming defer: livemig "
                    "sets them before it listens)") in r.stderr
            assert "Multifd must be set before incoming starts" in r.stderr
            assert not out.exists()  # refused before a guest was built
    finally:
        dst.close()


@pytest.mark.slow
def test_qemu10_with_a_72_machine_type(tmp_path: Path) -> None:
    """A 7.2 machine type on QEMU 10 turns multifd-flush-after-each-section on: livemig syncs at each
    EOS (MULTIFD_FLUSH as well would leave QEMU waiting), and still lists zero pages (QEMU 10 reads them)."""
    binary = qemu_or_skip("10.0")
    qmp_port, memory = _free_port(), 64 << 20
    dst = Qemu(binary, memory=memory, incoming=True,
               extra=["-machine", "pc-q35-7.2", "-qmp", f"tcp:127.0.0.1:{qmp_port},server=on,wait=off"]).start()
    try:
        r, res = _migrate(tmp_path, f"tcp:127.0.0.1:{qmp_port}", "--guest", "portable", "--multifd-compression",
                          "zstd", memory=memory)
        assert r.returncode == 0, r.stderr + dst.log()
        assert (res["destination"]["machine"], res["destination"]["sync"]) == ("pc-q35-7.2", "per-section")
        assert res["ram"]["duplicate"] > 0
        assert dst.read_ram() == (tmp_path / "dump" / "src-pc.ram.bin").read_bytes()
    finally:
        dst.close()
