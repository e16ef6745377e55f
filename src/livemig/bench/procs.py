"""Child processes the bench starts, and how they are all stopped (Ctrl-C included).

Every child starts in its own session (so its own process group). :func:`stop` kills the group and
any descendant that moved to another group (found through /proc), then reaps. :class:`Children`
remembers what was started and stops everything on exit, on exceptions and on KeyboardInterrupt.

:class:`NetNamespace` is a private network namespace with its own ``lo``: migrations run inside it
(``nsenter -n``) so the loopback counters count their sockets' bytes and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from .model import BenchError


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc/*/stat parent links), deepest last."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # the comm field may hold spaces and parentheses: split after its closing ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            parents[int(entry)] = int(fields[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        cur = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == cur]
        out.extend(kids)
        frontier.extend(kids)
    return out


def _signal(pids: Sequence[int], pgid: int | None, sig: int) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """Terminate ``proc``, its process group and its descendants; SIGKILL after ``grace`` s; reap."""
    if proc.poll() is not None and not descendants(proc.pid):
        return
    tree = descendants(proc.pid)
    pgid = proc.pid  # start_new_session: the child leads its own group
    _signal([proc.pid, *tree], pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(p) for p in tree):
            break
        time.sleep(0.05)
    _signal([proc.pid, *tree, *descendants(proc.pid)], pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Children:
    """Processes started through :meth:`spawn`, stopped together by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        try:
            proc: subprocess.Popen[Any] = subprocess.Popen(list(argv), start_new_session=True, **kw)
        except OSError as exc:
            raise BenchError(f"cannot start {argv[0]}: {exc}") from exc
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


#: IPv4 (20) + TCP (20) + timestamp option (12) bytes in front of every loopback TCP segment
TCP_HEADER = 52


class NetNamespace:
    """A network namespace held open by a sleeping child; ``prefix`` runs commands inside it."""

    def __init__(self, children: Children) -> None:
        self.children = children
        self.holder = children.spawn(
            ["unshare", "-n", "--", "sh", "-c", "ip link set lo up && echo ready && exec sleep 86400"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            err = self.holder.stderr.read() if self.holder.stderr else ""
            stop(self.holder)
            raise BenchError(f"cannot create a network namespace (unshare -n): {err.strip() or 'no output'}")

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--"]

    def lo_counters(self) -> tuple[int, int]:
        """(bytes, packets) transmitted on this namespace's lo so far."""
        with open(f"/proc/{self.holder.pid}/net/dev", encoding="utf-8") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    v = rest.split()
                    return int(v[8]), int(v[9])
        raise BenchError("no lo interface in the bench's network namespace")

    @staticmethod
    def payload(before: tuple[int, int], after: tuple[int, int]) -> int:
        """TCP payload bytes between two counter readings (every segment carries TCP_HEADER)."""
        return (after[0] - before[0]) - TCP_HEADER * (after[1] - before[1])

    def close(self) -> None:
        stop(self.holder)
