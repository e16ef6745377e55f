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


def _starttime(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] == "Z":
        return None
    return int(fields[19])


def _kill_same(tree: dict[int, int | None], sig: int) -> None:
    """Signal the processes of ``tree`` that are still the ones recorded (same pid and start time)."""
    for pid, started in tree.items():
        if started is not None and _starttime(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """Terminate a running ``proc``, its process group and its descendants (SIGTERM, then SIGKILL
    after ``grace`` s), and reap it.

    A child already reaped is left alone: its pid and group id may belong to others by now. The
    descendants are recorded with their start times while ``proc`` lives, so a reused pid is
    never signalled.
    """
    if proc.poll() is not None:
        return
    tree = {p: _starttime(p) for p in descendants(proc.pid)}
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: proc leads its own group
    _kill_same(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_starttime(p) == t for p, t in tree.items() if t is not None):
            return
        time.sleep(0.05)
    if proc.poll() is None:
        tree.update({p: _starttime(p) for p in descendants(proc.pid)})
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    _kill_same(tree, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


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

    def shape(self, rate: int) -> None:
        """Limit this namespace's loopback to ``rate`` bytes/s with a ``tc`` ``tbf`` qdisc (0: remove
        it): every migration socket in the namespace meets the same link, whatever its engine's own
        limiter does. The bucket holds 10 ms at that rate (at least 4 loopback frames of 64 KiB).
        Raises BenchError with tc's words when the kernel refuses."""
        if rate <= 0:
            argv = ["tc", "qdisc", "del", "dev", "lo", "root"]
        else:
            burst = max(rate // 100, 4 * 65536)
            argv = ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", f"{rate * 8}bit",
                    "burst", str(burst), "latency", "100ms"]
        done = subprocess.run(self.prefix + argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 and rate > 0:
            raise BenchError(f"cannot shape the namespace's loopback ({' '.join(argv)}): "
                             f"{done.stderr.strip() or f'exit status {done.returncode}'}")

    def close(self) -> None:
        stop(self.holder)
