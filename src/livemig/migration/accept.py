"""The destination's door: which connections become the migration's channels, and which are dropped.

A waiting destination must not be stopped or stalled by a stranger. :class:`Gate` takes every
connection its :class:`~livemig.transport.sockets.Listener` hands out and greets each on its own
thread, with an absolute deadline for its first bytes (however slowly they dribble in):

* ``QEVM``, the file version, a CONFIGURATION record with livemig's machine type and a livemig/config
  section that ``on_main`` accepts (the destination's uuid, protocol version, parameters, guest)
  make it *the* main channel (docs/wire.md, "Main stream"); once one did, any other main channel is
  refused. A main channel refused after its livemig/config (busy, wrong uuid, a configuration the
  destination cannot take) is answered a :class:`~.protocol.Refused` line with the reason first, so
  its source can say why;
* a CONFIGURATION with any other machine type is a QEMU source (docs/qemu.md, "QEMU as the
  source"): ``on_qemu(machine_type)`` accepts it (or raises MainRefusal) and it becomes the main
  channel at once, :attr:`qemu_machine` naming its machine type;
* the multifd magic and a valid MultiFDInit_t (version, the destination's uuid, an id below the
  channel count and not taken yet) make it multifd channel *id* (docs/wire.md, "Multifd handshake"),
  but only once a main channel was admitted: livemig's source opens its channels after Ready, a
  QEMU source at the same time as its main channel, so a channel waits for the main channel's
  admission until its first-bytes deadline;
* anything else (nothing within the deadline, a probe that closes, ``GET / HTTP/1.0``, a wrong uuid,
  a second main channel) is logged with the peer's address and the reason, and closed; the
  destination keeps waiting. No reason quotes the destination's uuid.

Connections are classified by their first four bytes, QEMU's rule since 8.0.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from ..errors import MigrationError, TransportError, WireError, os_reason
from ..transport.secure import secure_accepted
from ..transport.sockets import Listener
from ..transport.tls import TlsError
from ..wire import handshake, stream
from ..wire.constants import MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC
from ..wire.qemu import rp_shut
from . import protocol

#: greeter threads at once; a connection beyond them is closed at once (and logged)
MAX_GREETERS = 32


class _Refusal(Exception):
    """Why a connection is not a channel of this migration (logged, never raised to the caller)."""


class MainRefusal(_Refusal):
    """Why a main channel that sent its livemig/config is refused: answered to it as Refused, logged.
    ``on_main`` raises it; the destination keeps waiting for another main channel."""

    #: the refused channel is a QEMU source: answered SHUT 1 on QEMU's return path, not a Refused line
    qemu = False

#: seconds a refused main channel has to read its Refused line and close before it is closed
ANSWER_GRACE = 1.0


def _peer(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "an unknown peer"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name) or "a local peer"


class Gate:
    """Accepts and classifies connections until :meth:`close` (see the module doc).

    ``machine_type``: the CONFIGURATION machine type of a main channel; ``first_bytes``: seconds a
    connection has for its greeting; ``timeout``: the read timeout set on an admitted socket.
    ``on_main(config)`` runs on the greeter thread with the livemig/config bytes of a would-be main
    channel (one at a time); it raises :class:`MainRefusal` to refuse it, else the channel is admitted.
    ``on_qemu(machine_type)`` does the same for a QEMU source (which sends no livemig/config).
    ``on_channel(sock, id)`` runs on the greeter thread for each admitted multifd channel (it may
    block a while); an exception from it is the caller's to report.
    The main channel is :attr:`main` (with :attr:`main_reader`, which holds the bytes read past
    the CONFIGURATION) once :attr:`main_ready` is set. ``log(text)`` hears every refusal.
    """

    def __init__(self, listener: Listener, *, machine_type: str, uuid: bytes, channels: int,
                 first_bytes: float, timeout: float, log: Callable[[str], None],
                 on_main: Callable[[bytes], None], on_channel: Callable[[socket.socket, int], None],
                 on_qemu: Callable[[str], None]) -> None:
        self.listener = listener
        self.machine_type = machine_type
        self.uuid = uuid
        self.channels = channels
        self.first_bytes = first_bytes
        self.timeout = timeout
        self.log = log
        self.on_main = on_main
        self.on_channel = on_channel
        self.on_qemu = on_qemu
        #: the machine type of an admitted QEMU source's main channel (None: a livemig source)
        self.qemu_machine: str | None = None
        self.main: socket.socket | None = None
        self.main_reader: stream.StreamReader | None = None
        self.main_ready = threading.Event()
        #: the last refusal's text ("" if none), for an error that would otherwise not say why
        self.last_refusal = ""
        self._ids: set[int] = set()
        #: a main channel is being configured (on_main runs)
        self._claimed = False
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_GREETERS)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting (the listener is closed); admitted sockets stay open."""
        self._closed.set()
        self.listener.close()
        self._thread.join(timeout=2)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock = self.listener.accept(0.1)
            except TransportError:
                return
            if sock is None:
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(sock, _peer(sock), f"more than {MAX_GREETERS} connections greeting at once")
                continue
            threading.Thread(target=self._greet, args=(sock,), name="greet", daemon=True).start()

    def _refuse(self, sock: socket.socket, peer: str, reason: str) -> None:
        self.last_refusal = f"{peer}: {reason}"
        self.log(f"refused a connection from {peer}: {reason}; still waiting for the source")
        sock.close()

    def _greet(self, sock: socket.socket) -> None:
        peer = _peer(sock)
        try:
            deadline = time.monotonic() + self.first_bytes
            # TLS (with a TlsListener): handshake and authz within the same first-bytes deadline
            sock = secure_accepted(self.listener, sock, max(0.001, deadline - time.monotonic()))
            head = self._read(sock, 4, deadline, "its first 4 bytes")
            magic = int.from_bytes(head, "big")
            if magic == QEMU_VM_FILE_MAGIC:
                self._main(sock, head, deadline)
            elif magic == MULTIFD_MAGIC:
                cid = self._multifd(sock, head, deadline)
                sock.settimeout(self.timeout)
                self.on_channel(sock, cid)
            else:
                raise _Refusal(f"not a migration channel (first bytes {head!r}, expected {QEMU_VM_FILE_MAGIC:#x} "
                               f"'QEVM' or the multifd magic {MULTIFD_MAGIC:#x})")
        except MainRefusal as why:
            self._answer(sock, str(why), why.qemu)
            self._refuse(sock, peer, str(why))
        except _Refusal as why:
            self._refuse(sock, peer, str(why))
        except (WireError, TlsError, MigrationError) as exc:
            self._refuse(sock, peer, str(exc))
        finally:
            self._slots.release()

    @staticmethod
    def _answer(sock: socket.socket, reason: str, qemu: bool = False) -> None:
        """Tell a refused main channel why (a Refused line; a QEMU source, which reads only QEMU's
        return-path messages, gets SHUT 1), then let it read that before the close: half-close, and
        drain what it still sends for at most :data:`ANSWER_GRACE` seconds (closing with unread bytes
        would reset the connection and lose the answer)."""
        try:
            sock.settimeout(ANSWER_GRACE)
            sock.sendall(rp_shut(True) if qemu else protocol.encode(protocol.Refused(reason)))
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + ANSWER_GRACE
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except (OSError, ValueError):
            pass

    def _read(self, sock: socket.socket, n: int, deadline: float, what: str, already: int = 0) -> bytes:
        """Exactly ``n`` bytes before ``deadline``; _Refusal naming what did not come (``already``:
        bytes of it that came in earlier reads)."""
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                got = already + len(out)
                sent = f"only {got} bytes of {what}" if got else "nothing"
                raise _Refusal(f"sent {sent} within {self.first_bytes:g} s")
            try:
                sock.settimeout(left)
                chunk = sock.recv(n - len(out))
            except TimeoutError:
                continue
            except OSError as exc:
                raise _Refusal(f"connection failed: {os_reason(exc)}") from None
            if not chunk:
                raise _Refusal("closed before sending anything" if not out else f"closed after {len(out)} bytes")
            out += chunk
        return bytes(out)

    def _main(self, sock: socket.socket, head: bytes, deadline: float) -> None:
        reader = stream.StreamReader(control_lines=True)  # the source may Abort between two records
        reader.feed(head)
        got = len(head)
        config: bytes | None = None
        qemu: str | None = None
        while config is None and qemu is None:
            ev = reader.next_event()
            if ev is stream.NEED_DATA:
                reader.feed(self._read(sock, 1, deadline, "a main-stream header, CONFIGURATION and livemig/config",
                                       got))
                got += 1
            elif isinstance(ev, stream.Configuration):
                if ev.machine_type != self.machine_type:
                    qemu = ev.machine_type  # a QEMU source: no livemig/config follows
                    reader.expect_qemu()
            elif isinstance(ev, stream.Blob):
                if ev.idstr != "livemig/config":
                    raise _Refusal(f"main stream began with section '{ev.idstr}', not livemig/config")
                config = bytes(ev.data)
            elif not isinstance(ev, stream.Header | stream.SectionFull):
                raise _Refusal(f"main stream began with {type(ev).__name__}, not a CONFIGURATION and livemig/config")
        try:
            with self._lock:
                if self.main is not None or self._claimed:
                    raise MainRefusal("destination busy: a migration is already in progress")
                self._claimed = True
        except MainRefusal as why:
            why.qemu = qemu is not None
            raise
        try:
            if qemu is not None:
                try:
                    self.on_qemu(qemu)
                except MainRefusal as why:
                    why.qemu = True
                    raise
            else:
                assert config is not None
                self.on_main(config)
            with self._lock:
                sock.settimeout(self.timeout)
                self.main, self.main_reader, self.qemu_machine = sock, reader, qemu
        finally:
            with self._lock:
                self._claimed = False
        self.main_ready.set()

    def _multifd(self, sock: socket.socket, head: bytes, deadline: float) -> int:
        buf = head + self._read(sock, handshake.INIT_SIZE - 4, deadline, "a MultiFDInit_t")
        try:
            init = handshake.decode_init(buf, expected_uuid=self.uuid, channels=self.channels)
        except WireError as exc:
            if "uuid" in exc.what:
                raise _Refusal(f"multifd channel {buf[24]}: the uuid differs from this destination's") from None
            raise
        # livemig's source opens its multifd channels only after Ready; a QEMU source opens them with
        # its main channel, whose CONFIGURATION may come a little later: wait for it until the
        # first-bytes deadline. A channel with no main channel by then is a stranger taking an id.
        if not self.main_ready.wait(max(0.0, deadline - time.monotonic())):
            raise _Refusal(f"multifd channel {init.channel_id} connected before a main channel was admitted "
                           f"(none within {self.first_bytes:g} s)")
        with self._lock:
            if init.channel_id in self._ids:
                raise _Refusal(f"multifd channel {init.channel_id} is already connected")
            self._ids.add(init.channel_id)
        return init.channel_id
