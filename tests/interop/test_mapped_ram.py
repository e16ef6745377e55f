"""mapped-ram files, QEMU's format, both ways: livemig snapshots, files for QEMU 10, QEMU 10's own files.

The QEMU tests need ``qemu10`` (scripts/install-qemu) and skip, saying so, where it is missing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from livemig.errors import IntegrityError, MigrationError, WireError
from livemig.guest import GuestConfig, create_guest
from livemig.migration.mapped_file import FileSave
from livemig.migration.mapped_load import FileLoad, dump_name
from livemig.params import MigrationParameters
from livemig.wire import mapped_ram, stream
from support.migrate import cli
from support.qemu import DEFAULT_MEMORY, MiB, Qemu, known_ram, qemu_or_skip

PARAMS = MigrationParameters(multifd_channels=4, max_bandwidth=0)


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory in /dev/shm: the only place a chrooted QEMU 10 and this process share."""
    path = Path(tempfile.mkdtemp(prefix="livemig-mram-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def save_portable(path: Path, memory: int = 4 * MiB, fill: str = "random") -> None:
    guest = create_guest(GuestConfig(kind="portable", memory=memory, fill=fill, workload="counter", seed=3))
    try:
        guest.start()
        stats = FileSave(guest, str(path), PARAMS).run()
        assert stats.status == "completed", stats.error
    finally:
        guest.close()


# --- the bytes, against QEMU's ----------------------------------------------------------------------
#: the first 139 bytes of a file QEMU 10.0.13 wrote (q35, -nodefaults, 64 MiB, mapped-ram + multifd):
#: header, configuration with its capabilities, SECTION_START ram (id 1), MEM_SIZE, pc.ram, its header
QEMU10_PREFIX = bytes.fromhex(
    "5145564d00000003070000000b70632d7133352d31302e30051a636f6e66696775726174696f6e2f6361706162696c69"
    "7469657300000001000000010a6d61707065642d72616d01000000010372616d00000000000000040000000004082004"
    "0670632e72616d0000000004000000000000010000000000001000000000000000008b0000000000100000"
)
#: that file's blocks, and where QEMU put each one's bitmap and pages
QEMU10_BLOCKS = [("pc.ram", 0x4000000, 139, 0x100000), ("/rom@etc/acpi/tables", 0x20000, 68157497, 0x4200000),
                 ("pc.bios", 0x40000, 69337132, 0x4300000), ("pc.rom", 0x20000, 70516779, 0x4400000),
                 ("/rom@etc/table-loader", 0x1000, 71434298, 0x4500000),
                 ("/rom@etc/acpi/rsdp", 0x1000, 72355895, 0x4600000)]


def test_layout_is_qemus_byte_for_byte() -> None:
    """For QEMU's machine and blocks, livemig's writers produce QEMU's bytes and QEMU's offsets."""
    head = stream.file_header() + mapped_ram.configuration("pc-q35-10.0")
    blocks = [(name, size) for name, size, _, _ in QEMU10_BLOCKS]
    pieces, layouts, end = mapped_ram.ram_setup(len(head), 1, blocks, 4096)
    assert head + pieces[0][1] == QEMU10_PREFIX
    assert [(lay.name, lay.length, lay.bitmap_offset, lay.pages_offset) for lay in layouts] == QEMU10_BLOCKS
    assert end == 0x4600000 + 0x1000
    # and the parser reads it back (a file of just the setup, sparse pages, EOS, footer, EOF)
    raw = bytearray(end)
    for at, data in [(0, head), *pieces]:
        raw[at : at + len(data)] = data
    raw += stream.ram_eos() + stream.section_footer(1) + stream.eof()
    info = mapped_ram.parse(lambda at, n: bytes(raw[at : at + n]), len(raw), 4096)
    assert (info.machine_type, info.capabilities) == ("pc-q35-10.0", ["mapped-ram"])
    assert [(b.name, b.length, b.bitmap_offset, b.pages_offset) for b in info.blocks] == QEMU10_BLOCKS


# --- livemig -> livemig ----------------------------------------------------------------------------
def test_snapshot_restores_a_guest_that_carries_on(tmp_path: Path) -> None:
    """Save a running counter guest, restore it: it resumes at the counter value it was paused at,
    goes on counting, and its workload check (against an independent reference) passes."""
    snap = tmp_path / "snap.bin"
    save = cli("migrate", f"file:{snap}", "--mapped-ram", "--memory", "64M", "--workload", "counter",
               "--run-before", "0.5", "--max-bandwidth", "0", "--multifd-channels", "3", "--quiet",
               "--json", str(tmp_path / "save.json"))
    assert save.returncode == 0, save.stderr
    saved = json.loads((tmp_path / "save.json").read_text())
    assert saved["status"] == "completed" and saved["livemig"]["source-guest"] == "postmigrate"
    at_pause = saved["livemig"]["guest"]["progress-at-pause"]
    assert at_pause > 0
    load = cli("incoming", f"file:{snap}", "--run-after", "1", "--json", str(tmp_path / "load.json"))
    assert load.returncode == 0, load.stderr
    res = json.loads((tmp_path / "load.json").read_text())
    assert res["kind"] == "livemig" and res["resumed"] is True
    assert res["progress_at_resume"] == at_pause
    assert res["progress_after"] > at_pause
    assert res["workload_check"] == "ok"
    assert "guest resumed; then ran: progress" in load.stderr


def test_zero_pages_are_never_written(tmp_path: Path) -> None:
    """A zero-filled guest's file is sparse: its bitmap marks only the pages that hold data, and
    only those take disk space; the restored RAM equals the saved RAM."""
    snap = tmp_path / "snap.bin"
    save = cli("migrate", f"file:{snap}", "--mapped-ram", "--memory", "64M", "--guest", "portable", "--fill", "zero",
               "--max-bandwidth", "0", "--quiet", "--dump-ram", str(tmp_path / "src"), "--json", "-")
    assert save.returncode == 0, save.stderr
    normal = json.loads(save.stdout[: save.stdout.rindex("}") + 1])["ram"]["normal"]
    src = np.fromfile(tmp_path / "src" / "src-pc.ram.bin", dtype=np.uint8).reshape(-1, 4096)
    assert normal == int(np.count_nonzero(src.any(axis=1))) < 64  # a few guest pages at most
    assert os.stat(snap).st_blocks * 512 < 2 * MiB < os.stat(snap).st_size
    fd = os.open(snap, os.O_RDONLY)
    try:
        info = mapped_ram.parse(lambda at, n: os.pread(fd, n, at), os.fstat(fd).st_size, 4096)
        lay = info.blocks[0]
        bits = np.unpackbits(np.frombuffer(os.pread(fd, lay.bitmap_size, lay.bitmap_offset), np.uint8),
                             bitorder="little")
        assert int(bits.sum()) == normal
    finally:
        os.close(fd)
    load = cli("incoming", f"file:{snap}", "--dump-ram", str(tmp_path / "dst"))
    assert load.returncode == 0, load.stderr
    assert (tmp_path / "dst" / "dst-pc.ram.bin").read_bytes() == src.tobytes()


def test_snapshot_restores_into_a_guest_made_ahead(tmp_path: Path) -> None:
    """FileLoad restores into an incoming guest created beforehand (as a ``-incoming`` VM has one), and
    refuses one whose RAM is not the snapshot's."""
    snap = tmp_path / "snap.bin"
    save_portable(snap)
    for memory, ok in ((4 * MiB, True), (8 * MiB, False)):
        guest = create_guest(GuestConfig(kind="portable", memory=memory), incoming=True)
        load = FileLoad(str(snap), PARAMS, guest=guest, run_after=0.3)
        try:
            if ok:
                res = load.run()
                assert res["resumed"] and res["workload_check"] == "ok" and load.guest is guest
            else:
                with pytest.raises(MigrationError, match="the guest comes from the file"):
                    load.run()
        finally:
            load.close()
            guest.close()


# --- malformed files ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("magic", "not a QEMU migration file"),
        ("no-mapped-ram", "saved without mapped-ram"),
        ("header-version", "Mapped-ram header version not supported"),
        ("pages-offset", "bitmap, pages offsets"),
        ("truncated", "truncated"),
        ("damaged-page", "differs from the snapshot's digest"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, case: str, words: str) -> None:
    good = tmp_path / "good.bin"
    save_portable(good)
    raw = bytearray(good.read_bytes())
    lay = mapped_ram.parse(lambda at, n: bytes(raw[at : at + n]), len(raw), 4096).blocks[0]
    caps = raw.index(b"configuration/capabilities") + len("configuration/capabilities") + 4
    header = lay.bitmap_offset - mapped_ram.HEADER.size
    page = lay.pages_offset + 100
    patches = {
        "magic": (0, b"QEVN"),
        "no-mapped-ram": (caps + 5, b"xapped-ram"),
        "header-version": (header, struct.pack(">I", 2)),
        "pages-offset": (header + 20, struct.pack(">Q", (len(raw) + (1 << 20)) & ~4095)),
        "damaged-page": (page, bytes([raw[page] ^ 1])),
    }
    if case == "truncated":
        del raw[-100:]
    else:
        at, data = patches[case]
        raw[at : at + len(data)] = data
    path = tmp_path / "bad.bin"
    path.write_bytes(raw)
    load = FileLoad(str(path), PARAMS)
    try:
        with pytest.raises(IntegrityError if case == "damaged-page" else WireError, match=words):
            load.run()
    finally:
        load.close()
    if case == "magic":  # the command says it once, in words, with the file's name, exit status 1
        proc = cli("incoming", f"file:{path}")
        assert proc.returncode == 1
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], proc.stderr


def test_missing_file_and_options_refused(tmp_path: Path) -> None:
    proc = cli("incoming", f"file:{tmp_path}/nothing.bin")
    assert proc.returncode == 2 and "nothing.bin does not exist" in proc.stderr
    proc = cli("incoming", f"file:{tmp_path}")
    assert proc.returncode == 2 and "is not a file" in proc.stderr
    proc = cli("migrate", f"file:{tmp_path}/x.bin", "--memory", "8M")
    assert proc.returncode == 2 and "needs --mapped-ram" in proc.stderr
    proc = cli("migrate", f"file:{tmp_path}/x.bin", "--mapped-ram", "--memory", "8M", "--multifd-compression", "zstd")
    assert proc.returncode == 2 and "incompatible with compression" in proc.stderr
    assert not (tmp_path / "x.bin").exists()


# --- a full disk -------------------------------------------------------------------------------------
def _small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_fails_clearly(tmp_path: Path, how: str) -> None:
    """A file that cannot grow (an 8 MiB tmpfs; or RLIMIT_FSIZE just above the guest's RAM) fails the
    migration in words, removes the partial file and leaves the guest running."""
    if how == "tmpfs" and os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = _small_tmpfs(tmp_path) if how == "tmpfs" else None
    where = next(mounts) if mounts else tmp_path

    def limit() -> None:  # room for the guest's 32 MiB of RAM (a memfd counts too), not for the file
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * MiB + 4096, 32 * MiB + 4096))

    try:
        snap = where / "snap.bin"
        proc = subprocess.run(
            [sys.executable, "-m", "livemig.cli", "migrate", f"file:{snap}", "--mapped-ram", "--memory", "32M",
             "--guest", "portable", "--fill", "random", "--max-bandwidth", "0", "--quiet"],
            capture_output=True, text=True, timeout=120, preexec_fn=limit if how == "rlimit" else None,
        )  # fmt: skip
        words = "No space left on device" if how == "tmpfs" else "File too large"
        assert proc.returncode == 1, proc.stderr
        assert f"migration failed: cannot write {snap}: {words}" in proc.stderr
        assert "removed; the guest is running" in proc.stderr and "Traceback" not in proc.stderr
        assert not snap.exists()
    finally:
        if mounts:
            mounts.close()


# --- QEMU 10 ----------------------------------------------------------------------------------------
def test_qemu10_loads_livemig_file(tmp_path: Path, shm: Path) -> None:
    """livemig writes a file for QEMU (its machine type, its RAM block ram0); QEMU 10 loads it with
    ``migrate-incoming file:`` (mapped-ram, multifd) and its RAM is livemig's, byte for byte."""
    qemu = qemu_or_skip("10.0")
    path = shm / "for-qemu.bin"
    save = cli("migrate", f"file:{path}", "--mapped-ram", "--memory", str(DEFAULT_MEMORY), "--max-bandwidth", "0",
               "--machine-type", qemu.machine, "--ramblock", "ram0", "--multifd-channels", "4", "--quiet",
               "--dump-ram", str(tmp_path / "src"))
    assert save.returncode == 0, save.stderr
    with Qemu(qemu, incoming=True) as q:
        q.set_capabilities(mapped_ram=True, multifd=True)
        q.set_parameters(multifd_channels=2)
        q.migrate_incoming(f"file:{path}")
        info = q.wait_migration()
        assert info["status"] == "completed", (info, q.log())
        assert q.execute("query-status")["status"] in ("paused", "postmigrate")
        assert q.read_ram() == (tmp_path / "src" / "src-pc.ram.bin").read_bytes()


def test_livemig_reads_qemu10_file(tmp_path: Path, shm: Path) -> None:
    """QEMU 10 saves its guest (known RAM) with mapped-ram over 4 multifd channels; livemig reads the
    file, names the device sections it does not apply, and every RAM block it dumps is QEMU's."""
    qemu = qemu_or_skip("10.0")
    path = shm / "from-qemu.bin"
    with Qemu(qemu, loads=known_ram()) as q:
        q.set_capabilities(mapped_ram=True, multifd=True)
        q.set_parameters(multifd_channels=4)
        q.migrate(f"file:{path}")
        info = q.wait_migration()
        assert info["status"] == "completed", (info, q.log())
        ram = q.read_ram()
        blocks = {b["name"]: b["used"] for b in q.ramblocks()}
    assert os.stat(path).st_blocks * 512 < os.stat(path).st_size  # QEMU's file is sparse too
    load = cli("incoming", f"file:{path}", "--multifd-channels", "3", "--dump-ram", str(tmp_path / "dst"),
               "--json", str(tmp_path / "load.json"))
    assert load.returncode == 0, load.stderr
    res = json.loads((tmp_path / "load.json").read_text())
    assert res["kind"] == "qemu" and res["machine-type"] == qemu.machine and res["resumed"] is False
    assert dict((name, size) for name, size in res["blocks"]) == blocks
    assert "timer" in res["devices-not-applied"] and "cpu" in res["devices-not-applied"]
    assert "not applied: QEMU's CPU and device state" in load.stderr
    assert (tmp_path / "dst" / dump_name("ram0")).read_bytes() == ram
    for name, size in blocks.items():
        assert (tmp_path / "dst" / dump_name(name)).stat().st_size == size
