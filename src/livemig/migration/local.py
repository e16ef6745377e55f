"""``livemig migrate --local``: two ``livemig vm`` processes on this host, driven over QMP by the
driver ``livemig bench`` drives QEMU and ``livemig vm`` with (:class:`livemig.bench.drive.Peers`).

The source VM runs the guest, the destination VM waits with ``--incoming defer``; both get the
migration parameters with ``migrate-set-parameters``, the destination listens on a free loopback
port (``migrate-incoming tcp:127.0.0.1:0``), the source ``migrate``\\ s to it, and the source's
``query-migrate`` (QEMU's MigrationInfo, livemig's figures under ``livemig``) is the result. A
cancel (Ctrl-C, SIGTERM) is ``migrate_cancel`` (refused by the VM once in post-copy, where neither
side can go back). With ``--postcopy-ram`` both VMs get capability ``postcopy-ram`` and the source
``migrate-start-postcopy`` once precopy pass ``--postcopy-after-passes`` runs
(:class:`livemig.bench.drive.PostcopySwitch`); a migration that converges first completes as precopy.

Each child's stdout and stderr go to a log file in the temporary directory, never to the terminal,
so nothing they print lands on the progress bar; the log's last lines are shown if one dies.

The children die with this process: :func:`die_with_parent`, called by ``livemig vm`` first thing,
asks the kernel for SIGTERM when its parent exits (``prctl(PR_SET_PDEATHSIG)``), so a source killed
even by SIGKILL leaves no VM behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..bench.drive import Peers, Plan, PostcopySwitch
from ..bench.procs import stop
from ..bench.qmpconn import QmpConnection
from ..errors import MigrationError
from ..guest import GuestConfig
from ..params import MigrationParameters
from ..transport.tls import Tls
from .guestopts import _OPTIONS as GUEST_OPTIONS

#: seconds a VM may take to create (fill or prefault) its guest and open its QMP socket
START_TIMEOUT = 300.0
#: environment variable: the source's pid, given to the VMs it starts
PARENT_ENV = "LIVEMIG_LOCAL_PARENT"
#: prctl option: the signal this process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a VM started by :class:`LocalVM`: get SIGTERM when the ``migrate --local`` process dies.

    No-op in any other process (``PARENT_ENV`` unset). If the parent already died, SIGTERM now.
    """
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not Linux, or refused: the parent's own cleanup is all there is
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def guest_argv(cfg: GuestConfig) -> list[str]:
    """The ``livemig vm`` guest options that create ``cfg``."""
    return [arg for name, option in GUEST_OPTIONS.items() for arg in (option, str(getattr(cfg, name)))]


class LocalVM:
    """``livemig vm ARGS --qmp unix:TMPDIR/SIDE.qmp,server=on,wait=off`` as a child process in its own
    session (Ctrl-C reaches this process only, which then cancels and quits the child)."""

    def __init__(self, side: str, args: list[str], tmpdir: str) -> None:
        self.side = side
        self.qmp_path = os.path.join(tmpdir, f"{side}.qmp")
        self.log_file = os.path.join(tmpdir, f"{side}.log")
        cmd = [sys.executable, "-m", "livemig.cli", "vm", *args, "--name", f"livemig-local-{side}",
               "--qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        with open(self.log_file, "wb") as log:
            self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env={**os.environ, PARENT_ENV: str(os.getpid())})
        self.conn: QmpConnection | None = None

    def connect(self) -> QmpConnection:
        """The QMP connection once the VM serves it; MigrationError (with its last log lines) if it
        exits first or takes longer than :data:`START_TIMEOUT`."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.conn is None:
            if self.child.poll() is not None:
                raise self._error(f"the local {self.side} exited with status {self.child.returncode} before "
                                  "serving QMP")
            if time.monotonic() > deadline:
                raise self._error(f"the local {self.side} did not serve QMP within {START_TIMEOUT:.0f} s")
            if os.path.exists(self.qmp_path):
                with contextlib.suppress(MigrationError):
                    self.conn = QmpConnection.connect(self.qmp_path, f"the local {self.side}", timeout=1.0)
                    break
            time.sleep(0.02)
        return self.conn

    def _error(self, text: str) -> MigrationError:
        err = MigrationError(text)
        for line in self.log_lines()[-5:]:
            err.add_note(f"{self.side}: {line}")
        return err

    def log_lines(self) -> list[str]:
        """What the child printed so far, one entry a line, its ``livemig vm:`` prefix removed."""
        try:
            with open(self.log_file, errors="replace") as f:
                return [line.rstrip("\n").removeprefix("livemig vm: ") for line in f if line.strip()]
        except OSError:
            return []

    def quit(self) -> None:
        """``quit`` over QMP, 5 s to exit, then SIGTERM/SIGKILL (:func:`livemig.bench.procs.stop`)."""
        if self.conn is not None:
            with contextlib.suppress(MigrationError):
                self.conn.execute("quit", timeout=5.0)
            self.conn.close()
            self.conn = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(timeout=5)
        stop(self.child)


def plan(params: MigrationParameters, tls: Tls | None, run_before: float, auto_converge: bool = False,
         postcopy_ram: bool = False, postcopy_after_passes: int = 1) -> Plan:
    """Every parameter of ``params`` (and the TLS settings) as the driver's plan, listening on a free
    loopback port; no deadline (``--timeout`` is each VM's time without progress). ``auto_converge``
    adds that capability (the throttle parameters go to the source either way); ``postcopy_ram``
    adds capability ``postcopy-ram`` on both sides and the switch after precopy pass
    ``postcopy_after_passes`` (1 = after the first full copy)."""
    qapi = params.to_qapi()
    shared = {k: qapi[k] for k in ("multifd-zlib-level", "multifd-zstd-level", "multifd-qatzip-level",
                                   "zero-page-detection")}
    source = {k: qapi[k] for k in ("max-bandwidth", "max-passes", "cpu-throttle-initial", "cpu-throttle-increment",
                                   "cpu-throttle-tailslow", "max-cpu-throttle", "throttle-trigger-threshold")}
    if "max-postcopy-bandwidth" in qapi:
        source["max-postcopy-bandwidth"] = qapi["max-postcopy-bandwidth"]
    caps = ("multifd", "events") + (("auto-converge",) if auto_converge else ()) + \
        (("postcopy-ram",) if postcopy_ram else ())
    out = Plan(params.multifd_compression, params.multifd_channels, params.level() or 1, params.max_bandwidth,
               params.downtime_limit, "tcp:127.0.0.1:0", math.inf, settle_s=run_before, capabilities=caps,
               more=shared, source_more=source, exit_on_error=False,
               postcopy_after_passes=postcopy_after_passes if postcopy_ram else None)
    if tls is not None:
        out.tls_dir, out.tls_verify_peer = tls.creds.dir, tls.creds.verify_peer
        out.tls_hostname = tls.hostname or ""
    return out


class LocalMigration:
    """A source and a destination ``livemig vm``, started at once; :meth:`run` migrates between them.

    ``vm_args`` are both VMs' options (uuid, timeout, full-verify, dump-ram), ``cfg`` the guest.
    ``say`` prints one progress line (the destination's address, the guest's creation).
    """

    def __init__(self, cfg: GuestConfig, vm_args: list[str], tmpdir: str) -> None:
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.vms: list[LocalVM] = []
        self.vms.append(LocalVM("destination", [*guest_argv(cfg), "--incoming", "defer", *vm_args], tmpdir))
        self.vms.append(LocalVM("source", [*guest_argv(cfg), *vm_args], tmpdir))
        self.peers: Peers | None = None
        #: the source's latest query-migrate (the progress display reads it)
        self.info: dict[str, Any] = {}

    def connect(self, plan: Plan) -> str:
        """Both QMP connections, the parameters set, the destination listening; its URI."""
        dst, src = (vm.connect() for vm in self.vms)
        self.peers = Peers(src, dst)
        self.peers.configure(plan)
        return self.peers.listen(plan)

    def created_in(self) -> float:
        """Seconds from the start of both VMs until both served QMP (their guests created)."""
        return time.monotonic() - self.t0

    def run(self, plan: Plan, uri: str, cancel: threading.Event,
            on_info: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """``migrate`` to ``uri``, awaited to a final status (``migrate-start-postcopy`` sent after
        the plan's pass, with postcopy-ram); the source's last query-migrate."""
        assert self.peers is not None
        time.sleep(plan.settle_s)
        self.peers.migrate(uri)
        after = plan.postcopy_after_passes
        switch = None if after is None else PostcopySwitch(self.peers.src, after)

        def seen(info: dict[str, Any]) -> None:
            self.info = info
            if on_info is not None:
                on_info(info)

        return self.peers.src.await_final(math.inf, seen, cancel, switch)

    def destination_info(self) -> dict[str, Any]:
        """The destination's final query-migrate ({} when it cannot answer)."""
        assert self.peers is not None
        try:
            return self.peers.dst.await_final(time.monotonic() + 10)
        except MigrationError:
            return {}

    def workload(self, after: float) -> dict[str, Any]:
        """After ``after`` s: the destination guest's ``x-query-workload`` as the result's
        ``progress_after`` and ``workload_check`` ({} when it cannot answer)."""
        assert self.peers is not None
        time.sleep(after)
        try:
            w = self.peers.dst.execute("x-query-workload")
        except MigrationError:
            return {}
        return {"progress_after": w["progress"]} | ({"workload_check": w["check"]} if "check" in w else {})

    def close(self) -> None:
        """Quit both VMs (the source first, so a paused source guest is discarded, never resumed)."""
        for vm in reversed(self.vms):
            vm.quit()
