"""The destination process ``livemig migrate --local`` starts: ``livemig incoming`` on a free loopback port.

Its stdout and stderr go to a log file, never to the terminal, so nothing it prints lands on the
source's progress bar; the source shows what matters from it (its listening line before the
migration, its result from its ``--json`` file after, the log's last lines if it died without one).

The child dies with the source: :func:`die_with_parent`, called by ``livemig incoming`` first thing,
asks the kernel for SIGTERM when its parent exits (``prctl(PR_SET_PDEATHSIG)``), so a source killed
even by SIGKILL leaves no destination behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..errors import MigrationError

#: seconds the destination may take to prefault its RAM and listen
START_TIMEOUT = 300.0
#: environment variable: the source's pid, given to the destination it starts
PARENT_ENV = "LIVEMIG_LOCAL_PARENT"
#: prctl option: the signal this process gets when its parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a destination started by :class:`LocalDestination`: get SIGTERM when the source process dies.

    No-op in any other process (``PARENT_ENV`` unset). If the source already died, SIGTERM now.
    """
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not Linux, or refused: the source's own cleanup is all there is
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


class LocalDestination:
    """``livemig incoming tcp:127.0.0.1:0 ARGS`` as a child process in its own session (Ctrl-C reaches
    the source only, which then stops the child), with its files in ``tmpdir``."""

    def __init__(self, args: list[str], tmpdir: str) -> None:
        self.port_file = os.path.join(tmpdir, "port")
        self.json_file = os.path.join(tmpdir, "destination.json")
        self.log_file = os.path.join(tmpdir, "destination.log")
        cmd = [sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file", self.port_file,
               "--json", self.json_file, *args]
        #: whether :meth:`stop` had to signal it (its own result then only says it was terminated)
        self.stopped = False
        with open(self.log_file, "wb") as log:
            self.child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, env={**os.environ, PARENT_ENV: str(os.getpid())})

    def wait_listening(self) -> str:
        """The URI once the child listens; MigrationError (with its last log lines) if it exits first."""
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.port_file):
            if self.child.poll() is not None:
                err = MigrationError(f"the local destination exited with status {self.child.returncode} "
                                     "before listening")
                for line in self.log_lines()[-5:]:
                    err.add_note(f"destination: {line}")
                raise err
            if time.monotonic() > deadline:
                self.stop()
                raise MigrationError(f"the local destination did not start listening within {START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        with open(self.port_file) as f:
            return f"tcp:127.0.0.1:{int(f.read())}"

    def log_lines(self) -> list[str]:
        """What the child printed so far, one entry a line, its ``livemig incoming:`` prefix removed."""
        try:
            with open(self.log_file, errors="replace") as f:
                return [line.rstrip("\n").removeprefix("livemig incoming: ") for line in f if line.strip()]
        except OSError:
            return []

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait up to ``timeout`` s for the child to exit; its ``--json`` result ({} when it wrote none)."""
        try:
            self.child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        try:
            with open(self.json_file) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after 5 s."""
        if self.child.poll() is not None:
            return
        self.stopped = True
        try:
            os.killpg(self.child.pid, signal.SIGTERM)
            self.child.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.child.wait()
