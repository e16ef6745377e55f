"""One livemig migration per call: ``livemig migrate --local ... --json FILE`` in a child process.
The bench runs its rows this way only when an experiment carries ``extra_args`` (options only
``livemig migrate`` has); every other livemig row, TLS ones included, goes through
:func:`.vm_peer.run_livemig_vm`, QMP-driven like QEMU's rows.

The source process starts its own destination process (``--local``); the bench only reads the JSON
result and, when it runs the migration inside its private network namespace, the loopback bytes.
A run that fails returns a :class:`~livemig.bench.model.Run` carrying the error; only Ctrl-C
propagates (after the children are stopped by the caller's :class:`Children`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..units import parse_size
from .model import Run, not_finished, row_label
from .procs import Children, NetNamespace, stop

#: seconds a timed-out ``migrate --local`` gets to cancel and write its JSON after SIGTERM
CANCEL_GRACE_S = 20.0
#: how the bench starts livemig: the same interpreter, the installed package
LIVEMIG = [sys.executable, "-c", "import sys; from livemig.cli import main; sys.exit(main())"]


@dataclass
class Experiment:
    """What every migration of one bench shares."""

    guest: str
    memory: int
    workload: str
    fill: str
    smp: int = 1
    level: int = 1
    downtime_limit: int | None = None
    timeout: float = 900.0
    #: options only ``livemig migrate`` has (rows then run through it)
    extra_args: tuple[str, ...] = ()
    #: the workload's guest options (--dirty-rate, --working-set), given to the source either way
    workload_args: tuple[str, ...] = ()
    #: a tls-creds-x509 directory with both ends' files: every channel over TLS (rows METHOD+tls)
    tls_dir: str | None = None
    #: how the migration finishes: precopy, auto-converge or postcopy (:data:`.config.CONVERGENCE`)
    convergence: str = "precopy"
    #: post-copy: migrate-start-postcopy once precopy pass N runs
    postcopy_after_passes: int = 1

    def label(self, method: str) -> str:
        """The row label of ``method`` in this experiment (:func:`.model.row_label`)."""
        return row_label(method, self.convergence, bool(self.tls_dir))

    def convergence_args(self) -> list[str]:
        """``livemig migrate`` options of this experiment's convergence."""
        if self.convergence == "auto-converge":
            return ["--auto-converge"]
        if self.convergence == "postcopy":
            return ["--postcopy-ram", "--postcopy-after-passes", str(self.postcopy_after_passes)]
        return []


def migrate_argv(exp: Experiment, method: str, channels: int, bandwidth: int, json_path: str) -> list[str]:
    """The ``livemig migrate --local`` command line of one run."""
    argv = [
        *LIVEMIG,
        "migrate",
        "--local",
        "--guest", exp.guest,
        "--memory", str(exp.memory),
        "--smp", str(exp.smp),
        "--workload", exp.workload,
        "--fill", exp.fill,
        "--multifd-channels", str(channels),
        "--multifd-compression", method,
        "--max-bandwidth", str(bandwidth),
        "--json", json_path,
        "--quiet",
    ]  # fmt: skip
    if method in ("zlib", "zstd", "qatzip"):
        argv += [f"--multifd-{method}-level", str(exp.level)]
    if exp.downtime_limit is not None:
        argv += ["--downtime-limit", str(exp.downtime_limit)]
    if exp.tls_dir:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={exp.tls_dir.replace(',', ',,')},endpoint=client",
                 "--tls-creds", "tls0"]
    argv += list(exp.workload_args) + list(exp.extra_args) + exp.convergence_args()
    return argv


def tls_experiment(exp: Experiment, workdir: str) -> Experiment:
    """``exp`` over TLS: a fresh CA, server and client certificates (for 127.0.0.1) in
    ``workdir``/pki, given to ``migrate --local`` (which gives its destination the server side)."""
    from ..transport.certgen import make_pair  # cryptography is loaded only for --tls

    return dataclasses.replace(exp, tls_dir=str(make_pair(Path(workdir) / "pki")))


def _tail(text: str, lines: int = 3) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " / ".join(kept)


def run_livemig(
    children: Children,
    exp: Experiment,
    method: str,
    channels: int,
    bandwidth: int,
    repeat: int,
    workdir: str,
    netns: NetNamespace | None,
) -> Run:
    """Run one migration and return its Run (result or error). KeyboardInterrupt propagates."""
    label = exp.label(method)
    run = Run("livemig", label, channels, bandwidth, repeat)
    path = os.path.join(workdir, f"livemig-{label}-{channels}ch-{bandwidth}-{repeat}.json")
    timed_out = False
    argv = migrate_argv(exp, method, channels, bandwidth, path)
    if netns is not None:
        argv = netns.prefix + argv
    run.extra["argv"] = argv
    before = netns.lo_counters() if netns else None
    t0 = time.monotonic()
    proc = children.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=exp.timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM to migrate only: it cancels (migrate_cancel) and writes its JSON, then the rest is stopped
        timed_out = True
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            out, err = "", ""
    finally:
        if proc.poll() is None:
            stop(proc)
    run.extra["wall-s"] = time.monotonic() - t0
    if netns is not None and before is not None:
        run.extra["socket-bytes"] = NetNamespace.payload(before, netns.lo_counters())
    result: dict[str, Any] | None = None
    try:
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, dict):
            result = loaded
    except (OSError, ValueError) as exc:
        if proc.returncode == 0:
            run.error = f"no JSON result in {path}: {exc}"
            return run
    if timed_out:
        run.result = result
        run.error = not_finished(exp.timeout, result)
        return run
    if result is None:
        run.error = f"exit status {proc.returncode}: {_tail(err or out) or 'no output'}"
        return run
    run.result = result
    if result.get("status") != "completed":
        run.error = (
            f"status {result.get('status')}: {result.get('error-desc') or _tail(err) or 'no error text'}"
        )
    elif proc.returncode != 0:
        run.error = f"exit status {proc.returncode}: {_tail(err or out)}"
    return run


def parse_sizes(text: str) -> list[int]:
    """Comma list of sizes (``256M,1G``)."""
    return [parse_size(t) for t in text.split(",") if t.strip()]
