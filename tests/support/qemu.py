"""A real QEMU for the interop tests: find one, start it with known RAM, drive it over QMP.

Three QEMUs may be installed (each optional; a test that needs a missing one is skipped with the
reason):

- ``qemu-system-x86_64``: Debian 12's QEMU 7.2 (``scripts/install-qemu``);
- ``qemu10``: QEMU 10.0 from Debian trixie, run in a chroot at /opt/trixie by a wrapper;
- ``qemu-qatzip``: QEMU 10.0 built with qatzip, same chroot, its own wrapper.

The chroot shares only /dev, /dev/shm, /proc and /sys with the host, so every file a QEMU opens
(RAM backing file, firmware, loader images, the QMP socket) lives in a private directory under
/dev/shm, where both the host and the chroot see it at the same path.

The guest (:class:`Qemu`): ``-nodefaults``, q35 (``-cpu qemu64,-kvmclock``; KVM when /dev/kvm
works, else TCG), RAM a ``memory-backend-file`` with ``share=on`` on a file in that directory (so a
test reads the guest's RAM as a file, byte for byte), a 64 KiB firmware that halts the vCPU at the
reset vector (:func:`livemig.bench.qemu_peer.idle_firmware`: the guest runs and writes nothing, no
SeaBIOS remapping RAM while it boots), known bytes loaded with ``-device loader,file=F,addr=A,
force-raw=on``, ``-S`` and ``-incoming defer`` for a destination. QMP goes through ``qemu.qmp``
(the bench's synchronous :class:`QmpConnection`).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from livemig.bench.qemu_peer import idle_firmware
from livemig.bench.qmpconn import QmpConnection

MiB = 1 << 20
#: guest RAM size of the interop tests
DEFAULT_MEMORY = 256 * MiB
#: QEMU's final migration statuses
FINAL = ("completed", "failed", "cancelled")
#: kind -> (wrapper or binary name, what installs it)
KINDS = {
    "7.2": ("qemu-system-x86_64", "scripts/install-qemu (Debian 12's qemu-system-x86)"),
    "10.0": ("qemu10", "qemu10-setup (QEMU 10.0 from Debian trixie in a chroot at /opt/trixie)"),
    "qatzip": ("qemu-qatzip", "qemu-qatzip-build (QEMU 10.0 built with qatzip, chroot at /opt/trixie)"),
}


@dataclass(frozen=True)
class QemuBinary:
    """One installed QEMU: ``kind`` ("7.2", "10.0", "qatzip"), the command, its version."""

    kind: str
    path: str
    version: tuple[int, int]
    version_text: str

    @property
    def machine(self) -> str:
        """The versioned q35 machine type this QEMU defaults to (``pc-q35-7.2``, ``pc-q35-10.0``)."""
        return f"pc-q35-{self.version[0]}.{self.version[1]}"


_found: dict[str, QemuBinary | str] = {}


def find_qemu(kind: str) -> QemuBinary | str:
    """The QEMU of ``kind``, or the reason it cannot be used (a string). Cached per process."""
    if kind in _found:
        return _found[kind]
    name, installer = KINDS[kind]
    path = shutil.which(name)
    found: QemuBinary | str
    if path is None:
        found = f"no {name} on PATH (installed by {installer})"
    else:
        try:
            proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            proc = None
            found = f"{name} --version failed: {exc}"
        if proc is not None:
            m = re.search(r"version (\d+)\.(\d+)", proc.stdout)
            if proc.returncode != 0 or m is None:
                found = f"{name} --version failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
            else:
                found = QemuBinary(kind, path, (int(m[1]), int(m[2])), proc.stdout.splitlines()[0])
    _found[kind] = found
    return found


def qemu_or_skip(kind: str) -> QemuBinary:
    """:func:`find_qemu`, or ``pytest.skip`` with the reason it is missing."""
    found = find_qemu(kind)
    if isinstance(found, str):
        pytest.skip(found)
    return found


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


@dataclass
class Load:
    """Bytes the loader device puts at guest-physical address ``addr`` at reset."""

    addr: int
    data: bytes


@dataclass
class Qemu:
    """One QEMU process with file-backed RAM (see the module docstring). Use as a context manager
    (or call :meth:`start` and :meth:`close`); everything it made is removed by :meth:`close`.

    ``loads`` become ``-device loader`` images; ``incoming`` starts it paused (``-S``) with
    ``-incoming defer``; ``extra`` is appended to the command line."""

    binary: QemuBinary
    memory: int = DEFAULT_MEMORY
    loads: list[Load] = field(default_factory=list)
    incoming: bool = False
    name: str = "livemig-test"
    extra: list[str] = field(default_factory=list)
    workdir: str = ""
    proc: subprocess.Popen[bytes] | None = None
    qmp: QmpConnection | None = None

    @property
    def ram_path(self) -> str:
        """The RAM backing file (the guest's RAM block ``ram0``, offset 0 = guest-physical 0)."""
        return os.path.join(self.workdir, "ram0")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "qemu.log")

    def argv(self) -> list[str]:
        accel = "kvm" if kvm_available() else "tcg"
        firmware = os.path.join(self.workdir, "idle-firmware.bin")
        argv = [
            self.binary.path,
            "-name", self.name,
            "-machine", f"q35,accel={accel},memory-backend=ram0",
            "-cpu", "qemu64,-kvmclock",
            "-object", f"memory-backend-file,id=ram0,size={self.memory},mem-path={self.ram_path},share=on",
            "-m", f"{self.memory // MiB}M",
            "-bios", firmware,
            "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
            "-qmp", f"unix:{os.path.join(self.workdir, 'qmp.sock')},server=on,wait=off",
        ]  # fmt: skip
        for i, load in enumerate(self.loads):
            argv += ["-device", f"loader,file={os.path.join(self.workdir, f'load{i}.bin')},"
                     f"addr={load.addr:#x},force-raw=on"]
        if self.incoming:
            argv += ["-S", "-incoming", "defer"]
        return argv + self.extra

    def start(self) -> Qemu:
        """Write the files, start QEMU, connect QMP (QEMU's log is in the error if it dies)."""
        self.workdir = tempfile.mkdtemp(prefix="livemig-qemu-", dir="/dev/shm")
        with open(os.path.join(self.workdir, "idle-firmware.bin"), "wb") as f:
            f.write(idle_firmware())
        for i, load in enumerate(self.loads):
            with open(os.path.join(self.workdir, f"load{i}.bin"), "wb") as f:
                f.write(load.data)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.qmp = QmpConnection.connect(os.path.join(self.workdir, "qmp.sock"), self.name, timeout=60)
        except Exception as exc:
            raise AssertionError(f"{self.binary.path} did not start: {self.log()}") from exc
        return self

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self) -> str:
        """What QEMU printed so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read().strip() or "(nothing)"
        except OSError:
            return "(no log)"

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        """A QMP command's ``return`` value (raises BenchError naming the command)."""
        assert self.qmp is not None, "QEMU not started"
        return self.qmp.execute(command, arguments, timeout)

    def hmp(self, command: str) -> str:
        """An HMP command's output, through QMP's ``human-monitor-command``."""
        return str(self.execute("human-monitor-command", {"command-line": command}))

    def set_capabilities(self, **caps: bool) -> None:
        """``migrate-set-capabilities``; Python names, ``return_path=True`` -> ``return-path``."""
        self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]})

    def set_parameters(self, **params: Any) -> None:
        """``migrate-set-parameters``; Python names, ``multifd_channels=4`` -> ``multifd-channels``."""
        self.execute("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})

    def migrate(self, uri: str) -> None:
        self.execute("migrate", {"uri": uri})

    def migrate_incoming(self, uri: str) -> None:
        self.execute("migrate-incoming", {"uri": uri})

    def wait_migration(self, statuses: tuple[str, ...] = FINAL, timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until its status is one of ``statuses``; returns it. Raises
        AssertionError (with QEMU's log) after ``timeout`` s or when QEMU exits."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited with {self.proc.returncode}: {self.log()}")
            info: dict[str, Any] = self.execute("query-migrate")
            if info.get("status") in statuses:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU migration status {info.get('status')!r}, not {statuses} "
                                     f"after {timeout:.0f} s: {self.log()}")
            time.sleep(0.1)

    def ramblocks(self) -> list[dict[str, Any]]:
        """``info ramblock``: one dict per block (``name``; ``page-size``, ``offset``, ``used`` and
        ``total`` length in bytes), in QEMU's order."""
        blocks = []
        for line in self.hmp("info ramblock").splitlines():
            cols = line.split()
            if len(cols) >= 6 and cols[0] != "Block":
                page = int(cols[1]) << {"KiB": 10, "MiB": 20, "GiB": 30}[cols[2]]
                blocks.append({"name": cols[0], "page-size": page, "offset": int(cols[3], 16),
                               "used": int(cols[4], 16), "total": int(cols[5], 16)})
        return blocks

    def read_ram(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of the guest's RAM (the backing file) from guest-physical ``offset`` (below 2 GiB:
        q35 maps RAM from 0 up to there)."""
        with open(self.ram_path, "rb") as f:
            f.seek(offset)
            return f.read(self.memory - offset if length is None else length)

    def close(self) -> None:
        """``quit``, then SIGKILL if QEMU lingers; removes the work directory."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.execute("quit", timeout=5)
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""


def known_ram(memory: int = DEFAULT_MEMORY, seed: int = 1) -> list[Load]:
    """Loader images that give a guest known, varied RAM: a 16 MiB mix of random, text-like and
    zero pages at 16 MiB, and 256 KiB of random bytes every 4 MiB from 32 MiB to the end of RAM
    (so every channel sees pages of every kind). Deterministic for ``seed``."""
    rng = random.Random(seed)
    mix = bytearray()
    for i in range(16 * MiB // 4096):
        kind = i % 4
        if kind == 0:
            mix += rng.randbytes(4096)
        elif kind == 1:
            mix += ((b"livemig page %08x\n" % i) * 187)[:4096]
        elif kind == 2:
            mix += bytes(4096)
        else:
            mix += bytes([i & 0xFF]) * 4096
    loads = [Load(16 * MiB, bytes(mix))]
    loads += [Load(addr, rng.randbytes(256 * 1024)) for addr in range(32 * MiB, memory, 4 * MiB)]
    return loads
