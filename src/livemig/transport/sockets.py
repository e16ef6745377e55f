"""Socket helpers: connect/listen with QEMU-style addresses, exact reads, vectored writes, and the
seam between the migration engine and its transport.

The engine opens connections through a :class:`Connector` (source) and takes them from a
:class:`Listener` (destination). :class:`AddressConnector` / :class:`AddressListener` are the real
ones (TCP or unix socket at an :class:`~livemig.transport.address.Address`); :class:`SocketPairLink`
is both at once, in memory, over ``socket.socketpair()``: for running both sides in one process.

Every failure is raised as :class:`~livemig.errors.TransportError` naming what failed.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from ..errors import TransportError, os_reason
from .address import Address, claim_unix_path

#: SO_SNDBUF/SO_RCVBUF to set on every migration socket; 0 (the default) sets nothing and leaves the
#: kernel's defaults and autotuning in place (setting a size turns autotuning off for that socket)
SOCK_BUF = 0


def _tune(sock: socket.socket) -> None:
    for opt in ((socket.SO_SNDBUF, socket.SO_RCVBUF) if SOCK_BUF else ()):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(addr: Address, timeout: float) -> socket.socket:
    """Connected socket to ``addr``; TransportError if refused or timed out."""
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    _tune(sock)
    sock.settimeout(timeout)
    try:
        sock.connect(addr.sockaddr())
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot connect to {addr}: {os_reason(exc)}") from exc
    return sock


def listen(addr: Address, backlog: int) -> socket.socket:
    """Listening socket bound to ``addr`` (port 0 picks a free port). A unix socket file left by an
    earlier listener is replaced; a live one or a file that is not a socket is refused
    (:func:`~livemig.transport.address.claim_unix_path`, ParameterError)."""
    if addr.scheme == "unix":
        claim_unix_path(addr.path)
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _tune(sock)
    try:
        sock.bind(addr.sockaddr())
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {addr}: {os_reason(exc)}") from exc
    return sock


class Connector(Protocol):
    """Opens connections to the destination (the main channel, then one per multifd channel)."""

    def connect(self, timeout: float) -> socket.socket:
        """A new connected stream socket; TransportError if it cannot be opened."""
        ...


class Listener(Protocol):
    """Hands out the connections a source opened, in the order they arrive."""

    #: the TCP port really listened on (0 when not TCP)
    port: int

    def accept(self, timeout: float) -> socket.socket | None:
        """The next connection, or None when none came within ``timeout`` seconds; TransportError once
        the listener is closed."""
        ...

    def close(self) -> None:
        """Stop listening; connections not accepted yet are closed."""
        ...


class AddressConnector:
    """Connects to a TCP or unix-socket address."""

    def __init__(self, addr: Address) -> None:
        self.addr = addr

    def connect(self, timeout: float) -> socket.socket:
        return connect(self.addr, timeout)


class AddressListener:
    """Listens at a TCP or unix-socket address (``tcp:HOST:0`` picks a free port: see ``port``)."""

    def __init__(self, addr: Address, backlog: int) -> None:
        self.sock = listen(addr, backlog)
        self.port: int = self.sock.getsockname()[1] if addr.scheme == "tcp" else 0
        #: the unix socket file this listener created, and its identity (removed by close if still the same)
        self.path = addr.path if addr.scheme == "unix" else ""
        self._inode = _inode(self.path) if self.path else None

    def accept(self, timeout: float) -> socket.socket | None:
        try:
            self.sock.settimeout(timeout)
            sock, _ = self.sock.accept()
        except TimeoutError:
            return None
        except OSError as exc:
            raise TransportError(f"listener closed: {os_reason(exc)}") from exc
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        """Stop listening and remove the unix socket file, unless another listener replaced it."""
        self.sock.close()
        if self.path and self._inode is not None and _inode(self.path) == self._inode:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._inode = None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SocketPairLink:
    """A connector and listener in one, in memory: each ``connect()`` makes a ``socket.socketpair()``,
    returns one end and queues the other for ``accept()``. Same bytes, same socket calls as TCP."""

    port = 0

    def __init__(self) -> None:
        self._pending: queue.Queue[socket.socket] = queue.Queue()
        self._closed = threading.Event()

    def connect(self, timeout: float) -> socket.socket:
        if self._closed.is_set():
            raise TransportError("cannot connect to the in-memory listener: it is closed")
        mine, theirs = socket.socketpair()
        mine.settimeout(timeout)
        self._pending.put(theirs)
        return mine

    def accept(self, timeout: float) -> socket.socket | None:
        if self._closed.is_set():
            raise TransportError("in-memory listener closed")
        try:
            return self._pending.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._closed.set()
        while True:
            try:
                self._pending.get_nowait().close()
            except queue.Empty:
                return


#: a callable telling whether the migration as a whole still makes progress: a read that times out
#: on one channel keeps waiting while others move (a long pass can leave one socket quiet)
Alive = Callable[[], bool] | None


def _consume(views: list[memoryview], k: int) -> None:
    """Drop the first ``k`` bytes from a list of buffers (after a partial vectored read or write)."""
    while k:
        first = views[0]
        if k >= first.nbytes:
            k -= first.nbytes
            views.pop(0)
        else:
            views[0] = first[k:]
            k = 0


def _tls_reader(sock: ssl.SSLSocket) -> Callable[[int, memoryview], int]:
    """``read(n, buffer)`` for a TLS socket: :meth:`~.tls.ChannelSocket.bulk_reader` where it has one."""
    bulk = getattr(sock, "bulk_reader", None)
    return cast(Callable[[int, memoryview], int], bulk()) if bulk else lambda n, buffer: sock.recv_into(buffer, n)


def recv_into_buffers(sock: socket.socket, bufs: list[memoryview], what: str, alive: Alive = None,
                      eof_ok: bool = False, progress: Callable[[int], None] | None = None) -> bool:
    """Scatter-read exactly the total length of ``bufs`` into them (zero-copy into guest RAM).

    Returns False on EOF before the first byte if ``eof_ok`` (a peer that closed between packets).
    ``progress(n)`` hears each read's byte count as it lands. On a blocking socket (see
    :func:`kernel_timeouts`) each read waits for all of ``bufs`` (``MSG_WAITALL``: one system call
    per payload at full speed) or until the kernel's receive timeout, then returns what came. On a
    TLS socket (no ``recvmsg_into``) each buffer is filled by ``recv_into`` in turn.
    """
    views = [b for b in bufs if b.nbytes]
    want = sum(v.nbytes for v in views)
    got = 0
    read = _tls_reader(sock) if isinstance(sock, ssl.SSLSocket) else None
    flags = socket.MSG_WAITALL if read is None and sock.gettimeout() is None else 0
    while views:
        try:
            k = read(views[0].nbytes, views[0]) if read else sock.recvmsg_into(views[:512], 0, flags)[0]
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: the kernel's timeout
            if alive is not None and alive():
                continue
            raise TransportError(f"timed out reading {what}") from exc
        except (OSError, ValueError) as exc:  # ValueError: a TLS socket closed under us
            raise TransportError(f"connection failed while reading {what}: {os_reason(exc)}") from exc
        if k == 0:
            if got == 0 and eof_ok:
                return False
            raise TransportError(f"connection closed after {got} of {want} bytes of {what}")
        got += k
        if progress is not None:
            progress(k)
        if k == views[0].nbytes and len(views) == 1:
            return True
        _consume(views, k)
    return True


def recv_exact_into(sock: socket.socket, buf: memoryview, what: str, eof_ok: bool = False,
                    alive: Alive = None, progress: Callable[[int], None] | None = None) -> bool:
    """Fill ``buf`` from ``sock``. Returns False on EOF before the first byte if ``eof_ok``."""
    return recv_into_buffers(sock, [buf], what, alive, eof_ok, progress)


def kernel_timeouts(sock: socket.socket, recv: float, send: float) -> None:
    """Make a plain socket blocking, with the kernel's ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` (seconds)
    instead of Python's timeout: a read or write is then one system call that returns when done or
    when the kernel's timeout passes (with what moved so far; nothing moved: ``BlockingIOError``,
    which :func:`recv_into_buffers` and :func:`send_buffers` treat as a timeout). A TLS socket is
    left as it is (its reads and writes go through ``ssl``)."""
    if isinstance(sock, ssl.SSLSocket):
        return
    for opt, seconds in ((socket.SO_RCVTIMEO, recv), (socket.SO_SNDTIMEO, send)):
        sec = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, opt, struct.pack("@ll", sec, int((seconds - sec) * 1e6)))
    sock.settimeout(None)


#: on a TLS socket, buffers smaller than this are joined before they are written (each write is at
#: least one TLS record); larger ones are written as they are
TLS_JOIN = 64 << 10


def _send_tls(sock: ssl.SSLSocket, views: list[memoryview]) -> None:
    """``sendall`` of each buffer, small neighbours joined (SSLSocket has no ``sendmsg``)."""
    small: list[memoryview] = []
    size = 0
    for v in views:
        if v.nbytes < TLS_JOIN:
            small.append(v)
            size += v.nbytes
            if size < TLS_JOIN:
                continue
        if small:
            sock.sendall(b"".join(small))
            small, size = [], 0
        if v.nbytes >= TLS_JOIN:
            sock.sendall(v)
    if small:
        sock.sendall(b"".join(small))


def send_buffers(sock: socket.socket, bufs: Sequence[bytes | bytearray | memoryview], what: str) -> int:
    """Write every buffer, in order, with vectored sends (TLS: see :func:`_send_tls`); returns the
    bytes written."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    total = sum(v.nbytes for v in views)
    try:
        if isinstance(sock, ssl.SSLSocket):
            _send_tls(sock, views)
        else:
            while views:
                _consume(views, sock.sendmsg(views[:512]))
    except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: the kernel's timeout
        raise TransportError(f"timed out writing {what}") from exc
    except (OSError, ValueError) as exc:  # ValueError: a TLS socket closed under us
        raise TransportError(f"connection failed while writing {what}: {os_reason(exc)}") from exc
    return total


class LineChannel:
    """JSON lines on a socket: livemig's return path (destination -> source) on the main channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, msg: dict[str, Any]) -> None:
        send_buffers(self.sock, [json.dumps(msg).encode() + b"\n"], "return-path message")

    def recv(self, timeout: float | None) -> dict[str, Any]:
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while b"\n" not in self._buf:
                if len(self._buf) > 1 << 20:
                    raise TransportError("return-path message longer than 1 MiB")
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError as exc:
                    raise TransportError(f"no answer from the destination within {timeout:.0f} s") from exc
                except OSError as exc:
                    raise TransportError(f"return path failed: {os_reason(exc)}") from exc
                if not chunk:
                    raise TransportError("the destination closed the connection")
                self._buf += chunk
        finally:
            self.sock.settimeout(old)
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise TransportError(f"return-path message is not JSON: {line[:80]!r}") from exc
        if not isinstance(msg, dict):
            raise TransportError(f"return-path message is not an object: {line[:80]!r}")
        return msg
