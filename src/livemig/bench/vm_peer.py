"""livemig's bench rows: two ``livemig vm`` processes (the destination with ``--incoming defer``)
driven over QMP by :func:`.drive.drive`, the code that drives QEMU's rows.

The source's final ``query-migrate`` is the run's result: QEMU's MigrationInfo with livemig's own
figures (send/recv CPU %, memory, wire bytes, compression ratio) under its ``livemig`` key, the
destination's measured by itself and reported over the return path. Rows over TLS get
``object-add tls-creds-x509`` and ``tls-creds`` on both sides (:attr:`.drive.Plan.tls_dir`).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from typing import Any

from ..errors import MigrationError
from .drive import Plan, drive, quit_all
from .model import Run
from .procs import Children, NetNamespace
from .qmpconn import QmpConnection
from .runner import LIVEMIG, Experiment

PORT = 4445  # inside the bench's private network namespace (or loopback when there is none)


def vm_argv(exp: Experiment, qmp: str, incoming: bool) -> list[str]:
    """The ``livemig vm`` command line of one side of a bench run."""
    argv = [*LIVEMIG, "vm", "--guest", exp.guest, "--memory", str(exp.memory), "--smp", str(exp.smp),
            "--qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        return [*argv, "--incoming", "defer", "--name", "livemig-bench-dst"]
    return [*argv, "--workload", exp.workload, *exp.workload_args, "--fill", exp.fill, "--name", "livemig-bench-src"]


def run_livemig_vm(children: Children, exp: Experiment, method: str, channels: int, bandwidth: int,
                   repeat: int, workdir: str, netns: NetNamespace | None) -> Run:
    """One livemig migration between two ``livemig vm`` processes; errors land in the Run
    (KeyboardInterrupt propagates)."""
    run = Run("livemig", exp.label(method), channels, bandwidth, repeat)
    tag = uuid.uuid4().hex[:6]
    procs: list[subprocess.Popen[Any]] = []
    clients: list[QmpConnection] = []
    logs: list[Any] = []
    try:
        for side, incoming in (("dst", True), ("src", False)):
            qmp = os.path.join(workdir, f"livemig-{side}-{tag}.qmp")
            log = open(os.path.join(workdir, f"livemig-{side}-{tag}.log"), "w+", encoding="utf-8")  # noqa: SIM115
            logs.append(log)
            argv = (netns.prefix if netns else []) + vm_argv(exp, qmp, incoming)
            procs.append(children.spawn(argv, stdout=log, stderr=subprocess.STDOUT))
            try:
                clients.append(QmpConnection.connect(qmp, f"the {side} livemig vm", timeout=120))
            except MigrationError as exc:
                log.seek(0)
                exc.add_note(f"livemig vm said: {log.read().strip() or 'nothing'}")
                raise
        run.extra["argv"] = [p.args for p in procs]
        dst_proc, src_proc = procs
        dst, src = clients
        caps = ("multifd", "events") + {"precopy": (), "auto-converge": ("auto-converge",),
                                        "postcopy": ("postcopy-ram",)}[exp.convergence]
        plan = Plan(method, channels, exp.level, bandwidth, exp.downtime_limit, f"tcp:127.0.0.1:{PORT}",
                    exp.timeout, capabilities=caps, tls_dir=exp.tls_dir,
                    postcopy_after_passes=exp.postcopy_after_passes if exp.convergence == "postcopy" else None)
        d = drive(src, dst, src_proc.pid, dst_proc.pid, plan, netns)
        run.extra.update({"wall-s": d.wall_s, "dst-status": d.dinfo.get("status"),
                          "dst-vm-status": d.dst_vm_status, "qmp-log": d.log, "driven-over": "qmp"})
        if d.socket_bytes is not None:
            run.extra["socket-bytes"] = d.socket_bytes
        run.result = d.info
        if d.info.get("status") != "completed":
            run.error = f"status {d.info.get('status')}: {d.info.get('error-desc', 'no error text')}"
        elif d.dinfo.get("status") != "completed":
            run.error = f"destination status {d.dinfo.get('status')}: {d.dinfo.get('error-desc', '')}"
    except MigrationError as exc:
        run.error = str(exc) + "".join(f"; {n}" for n in getattr(exc, "__notes__", []))
    finally:
        quit_all(clients, procs, logs)
    return run
