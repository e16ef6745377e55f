"""``--peer qemu``: the same experiment with QEMU's own multifd migration, driven over QMP.

Per run: two fresh ``qemu-system-x86_64`` processes (``-machine pc`` with KVM, or TCG where KVM
is missing; ``-nodefaults``; a 64 KiB firmware that halts the vCPU at the reset vector, so the
guest runs but writes nothing, as livemig's idle guest: see :func:`idle_firmware`). The source's
RAM is a ``memory-backend-file`` with ``share=on`` on a file in /dev/shm holding the same data as
livemig's guest (written once by the engine's fill code); the destination's RAM is a
``memory-backend-memfd`` with ``prealloc=on``, as livemig's destination RAM is prefaulted. Both
sides get the multifd and events capabilities and the same channels, method and level; the source
also the cap and the downtime limit. Then ``migrate-incoming`` / ``migrate``, and ``query-migrate``
polled until the end. Send/recv CPU % come from /proc/<pid>/stat over the total time; the bytes
really written to the sockets from the bench's private network namespace (QEMU 7.2's own counters
count multifd pages uncompressed). The QEMU facts this relies on are in docs/bench.md; QMP is
spoken through the ``qemu.qmp`` package, by the driver livemig's rows use too (:func:`.drive.drive`)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import uuid
from typing import Any

from ..errors import MigrationError
from .data import write_ram_file
from .drive import Plan, drive, quit_all
from .model import BenchError, Run
from .procs import Children, NetNamespace
from .qmpconn import QmpConnection
from .runner import Experiment

__all__ = ["QemuPeer", "QmpConnection", "idle_firmware"]

QEMU = "qemu-system-x86_64"
#: multifd-compression values and the QEMU version that added each (docs/bench.md, "QEMU versions")
METHOD_SINCE = {
    "none": (5, 0),
    "zlib": (5, 0),
    "zstd": (5, 0),
    "qpl": (9, 1),
    "uadk": (9, 1),
    "qatzip": (9, 2),
}
#: seconds the source guest runs before ``migrate``
FIRMWARE_SETTLE_S = 1.0
PORT = 4444  # inside the bench's private network namespace (or loopback when there is none)


def idle_firmware() -> bytes:
    """A 64 KiB PC firmware image whose reset vector halts the vCPU for good.

    QEMU maps ``-bios`` below 4 GiB; the vCPU starts at 0xFFFFFFF0 (image offset 0xFFF0) in real
    mode with interrupts disabled, executes ``hlt`` and, should anything wake it, ``jmp`` back to
    it. The guest writes no memory, like livemig's idle guest. (SeaBIOS with no boot device is not
    idle in that sense: measured here, its retry loop made QEMU 7.2 send 1.93x the RAM's pages
    at a 1 Gbit/s cap, against 1.00x with this image or a paused guest.)
    """
    image = bytearray(b"\xf4" * 65536)  # hlt everywhere
    image[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"  # reset vector: hlt; jmp hlt
    return bytes(image)


class QemuPeer:
    """Runs QEMU migrations for the bench; :meth:`run` returns a Run (result, error or n/a)."""

    def __init__(self, children: Children, exp: Experiment, workdir: str, netns: NetNamespace | None) -> None:
        self.children = children
        self.exp = exp
        self.workdir = workdir
        self.netns = netns
        self.binary = shutil.which(QEMU)
        self.version: tuple[int, int] = (0, 0)
        self.version_text = ""
        self.unavailable: str | None = None
        self.ram_file: str | None = None
        if self.binary is None:
            self.unavailable = f"no {QEMU}; install qemu-system-x86 (scripts/install-qemu)"
            return
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            self.unavailable = f"{QEMU} --version failed: {exc}"
            return
        self.version_text = out.splitlines()[0] if out else "unknown"
        m = re.search(r"version (\d+)\.(\d+)", out)
        if m:
            self.version = (int(m.group(1)), int(m.group(2)))
        self.accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"

    def describe(self) -> dict[str, Any]:
        return {
            "peer": "qemu",
            "binary": self.binary,
            "version": self.version_text,
            "unavailable": self.unavailable,
            "accel": getattr(self, "accel", None),
            "guest": "vCPU running, halted at the reset vector (64 KiB hlt firmware); RAM = the same data",
        }

    def method_na(self, method: str) -> str | None:
        if self.unavailable:
            return self.unavailable
        since = METHOD_SINCE.get(method)
        v = f"{self.version[0]}.{self.version[1]}"
        if since is None:
            return f"QEMU has no multifd-compression '{method}'"
        if self.version < since:
            return f"QEMU {v} has no {method} (since {since[0]}.{since[1]})"
        return None

    def _ensure_ram_file(self) -> str:
        if self.ram_file is not None:
            return self.ram_file
        path = f"/dev/shm/livemig-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}.ram"
        self.ram_file = path
        try:
            write_ram_file(path, self.exp.fill, self.exp.memory)
        except OSError as exc:
            raise BenchError(f"cannot write QEMU's RAM file {path}: {exc}") from exc
        return path

    def _argv(self, name: str, backend: str, qmp: str, incoming: bool) -> list[str]:
        argv = [
            str(self.binary),
            "-name", name,
            "-machine", f"pc,accel={self.accel},memory-backend=ram0",
            "-object", backend,
            "-m", str(self.exp.memory // (1 << 20)) + "M",
            "-smp", str(self.exp.smp),
            "-bios", self._firmware(),
            "-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]  # fmt: skip
        if incoming:
            argv += ["-incoming", "defer"]
        return (self.netns.prefix if self.netns else []) + argv

    def _firmware(self) -> str:
        """Write (once) and return the idle firmware image (see :func:`idle_firmware`)."""
        path = os.path.join(self.workdir, "idle-firmware.bin")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(idle_firmware())
        return path

    def run(self, method: str, channels: int, bandwidth: int, repeat: int) -> Run:
        """One QEMU migration; errors land in the Run (KeyboardInterrupt propagates)."""
        run = Run("qemu", method, channels, bandwidth, repeat)
        na = self.method_na(method)
        if na:
            run.na = na
            return run
        if self.exp.workload != "idle":
            run.na = f"QEMU peer runs an idle firmware guest only, not workload '{self.exp.workload}'"
            return run
        procs: list[subprocess.Popen[Any]] = []
        clients: list[QmpConnection] = []
        tag = uuid.uuid4().hex[:6]
        logs: list[Any] = []
        try:
            ram = self._ensure_ram_file()
            size = self.exp.memory
            src_qmp = os.path.join(self.workdir, f"qemu-src-{tag}.qmp")
            dst_qmp = os.path.join(self.workdir, f"qemu-dst-{tag}.qmp")
            src_backend = f"memory-backend-file,id=ram0,size={size},mem-path={ram},share=on"
            dst_backend = f"memory-backend-memfd,id=ram0,size={size},prealloc=on"
            for name, backend, qmp, incoming in (
                ("livemig-bench-dst", dst_backend, dst_qmp, True),
                ("livemig-bench-src", src_backend, src_qmp, False),
            ):
                log = open(os.path.join(self.workdir, f"{name}-{tag}.log"), "w+", encoding="utf-8")  # noqa: SIM115
                logs.append(log)
                procs.append(
                    self.children.spawn(
                        self._argv(name, backend, qmp, incoming), stdout=log, stderr=subprocess.STDOUT
                    )
                )
            dst_proc, src_proc = procs
            run.extra["argv"] = [p.args for p in procs]
            try:
                # preallocating the destination's RAM takes a while
                dst = QmpConnection.connect(dst_qmp, "the destination QEMU", timeout=120)
                clients.append(dst)
                src = QmpConnection.connect(src_qmp, "the source QEMU", timeout=60)
                clients.append(src)
            except BenchError as exc:
                for log in logs:
                    log.seek(0)
                said = " / ".join(log.read().strip() for log in logs)
                raise BenchError(f"{exc}; QEMU said: {said or 'nothing'}") from exc
            plan = Plan(method, channels, self.exp.level, bandwidth, self.exp.downtime_limit,
                        f"tcp:127.0.0.1:{PORT}", self.exp.timeout, settle_s=FIRMWARE_SETTLE_S)
            d = drive(src, dst, src_proc.pid, dst_proc.pid, plan, self.netns)
            info, dinfo = d.info, d.dinfo
            run.extra.update({"source-status-before": d.source_status_before, "wall-s": d.wall_s,
                              "dst-status": dinfo.get("status"), "dst-vm-status": d.dst_vm_status,
                              "qmp-log": d.log})
            if d.socket_bytes is not None:
                run.extra["socket-bytes"] = d.socket_bytes
            total = float(info.get("total-time", 0)) or 1.0
            run.result = {
                "status": info.get("status"),
                "total-time": info.get("total-time"),
                "setup-time": info.get("setup-time"),
                "downtime": info.get("downtime"),
                "ram": info.get("ram", {}),
                "livemig": {
                    "method": method,
                    "level": self.exp.level if method != "none" else None,
                    "backend": f"{self.version_text}, accel={self.accel}",
                    "accelerated": False,
                    "channels": channels,
                    "max-bandwidth": bandwidth,
                    "send-cpu-percent": 100.0 * d.src_cpu_s / (total / 1000.0),
                    "recv-cpu-percent": 100.0 * d.dst_cpu_s / (total / 1000.0),
                    "guest": {
                        "kind": f"qemu-{self.accel}",
                        "memory": size,
                        "smp": self.exp.smp,
                        "workload": "idle (halted vCPU)",
                        "fill": self.exp.fill,
                    },  # fmt: skip
                },
                "qemu": {"source": info, "destination": dinfo},
            }
            if info.get("status") != "completed":
                run.error = f"QEMU status {info.get('status')}: {info.get('error-desc', 'no error text')}"
            elif dinfo.get("status") != "completed":
                run.error = f"QEMU destination status {dinfo.get('status')}: {dinfo.get('error-desc', '')}"
        except MigrationError as exc:
            run.error = str(exc)
        finally:
            quit_all(clients, procs, logs)
        return run

    def close(self) -> None:
        """Remove the /dev/shm RAM file (always called, Ctrl-C included)."""
        if self.ram_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ram_file)
            self.ram_file = None
