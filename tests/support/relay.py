"""A threaded TCP relay for tests: a link between source and destination that misbehaves on cue.

``Relay(("127.0.0.1", port), up=Tap(...), down=Tap(...))`` listens on 127.0.0.1:0 (``relay.uri``
is ``tcp:127.0.0.1:PORT``) and forwards every accepted connection to the target. ``up`` is the
connecting side -> target direction (source -> destination), ``down`` the other (the return path).

Taps act on the relay's *first* connection only (livemig's main channel: the source opens it
before any multifd channel); later connections are plain pipes. A tap works on lines (bytes up to
and including ``b"\\n"``), and matches a line by its 0-based index in that direction (``int``) or
by a substring (``bytes``):

* ``drop``: swallow the first matching line;
* ``delay=(match, seconds)``: hold the first matching line, and everything behind it, that long;
* ``silence_after``: forward the matching line, then nothing more in this direction (the
  connection stays open: a one-way partition);
* ``cut_after``: forward the matching line, then close both directions of the connection.

Binary data (the main stream) passes through: bytes that cannot start a JSON line (anything but
``{`` after a newline) are forwarded at once, and a partial line is forwarded anyway after
``hold`` seconds without more bytes, so a stream's tail never waits for a newline that is not
coming. ``tap.lines`` records every complete line seen, before any action.
``relay.cut()`` closes every connection both ways, now.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field

Match = int | bytes


@dataclass
class Tap:
    """What the relay does to one direction of its first connection (see the module doc)."""

    drop: Match | None = None
    delay: tuple[Match, float] | None = None
    silence_after: Match | None = None
    cut_after: Match | None = None
    lines: list[bytes] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    _done: set[str] = field(default_factory=set)

    def _hit(self, what: str, m: Match | None, index: int, line: bytes) -> bool:
        if m is None or what in self._done or not (m == index if isinstance(m, int) else m in line):
            return False
        self._done.add(what)
        return True

    def on_line(self, line: bytes) -> tuple[bytes, float, str]:
        """(bytes to forward, seconds to wait first, then "" / "silent" / "cut") for one whole line."""
        i = len(self.lines)
        self.lines.append(line)
        if self._hit("drop", self.drop, i, line):
            self.dropped.append(line)
            return b"", 0.0, ""
        wait = self.delay[1] if self.delay and self._hit("delay", self.delay[0], i, line) else 0.0
        if self._hit("silence", self.silence_after, i, line):
            return line, wait, "silent"
        if self._hit("cut", self.cut_after, i, line):
            return line, wait, "cut"
        return line, wait, ""


class _Conn:
    """One relayed connection: two pumps, each copying one direction through its tap."""

    def __init__(self, relay: Relay, client: socket.socket, server: socket.socket, up: Tap | None,
                 down: Tap | None) -> None:
        self.relay = relay
        self.socks = (client, server)
        self.threads = [threading.Thread(target=self._pump, args=(client, server, up), daemon=True),
                        threading.Thread(target=self._pump, args=(server, client, down), daemon=True)]
        for t in self.threads:
            t.start()

    def cut(self) -> None:
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump(self, src: socket.socket, dst: socket.socket, tap: Tap | None) -> None:
        pending = b""
        silent = False
        src.settimeout(self.relay.hold if tap else None)
        try:
            while True:
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    if pending and not silent:  # a partial line that is not coming to an end: let it go
                        dst.sendall(pending)
                    pending = b""
                    continue
                if not data:
                    break
                if silent:
                    continue
                if tap is None:
                    dst.sendall(data)
                    continue
                pending += data
                while pending and not silent:
                    nl = pending.find(b"\n")
                    if nl < 0:
                        if not pending.startswith(b"{"):
                            dst.sendall(pending)
                            pending = b""
                        break
                    line, pending = pending[:nl + 1], pending[nl + 1:]
                    out, wait, then = tap.on_line(line)
                    if wait:
                        time.sleep(wait)
                    if out:
                        dst.sendall(out)
                    if then == "cut":
                        self.cut()
                        return
                    silent = then == "silent"
            dst.shutdown(socket.SHUT_WR)  # pass the EOF on
        except OSError:
            self.cut()


class Relay:
    """A TCP relay from 127.0.0.1:``port`` to ``target``; a context manager that closes it all."""

    def __init__(self, target: tuple[str, int], up: Tap | None = None, down: Tap | None = None,
                 hold: float = 0.2) -> None:
        self.target = target
        self.up = up
        self.down = down
        self.hold = hold
        self.conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                first = not self.conns
                if self._closed:
                    client.close()
                    server.close()
                    return
                self.conns.append(_Conn(self, client, server, self.up if first else None,
                                        self.down if first else None))

    def cut(self) -> None:
        """Close every relayed connection, both ways, now (a cut link)."""
        with self._lock:
            for c in self.conns:
                c.cut()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        self._acceptor.join(timeout=5)
        self.cut()
        for c in self.conns:
            for t in c.threads:
                t.join(timeout=5)
            for s in c.socks:
                s.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
