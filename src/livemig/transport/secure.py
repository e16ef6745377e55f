"""TLS on every migration channel: a connector and a listener that secure each connection.

The source opens its channels through a :class:`TlsConnector` (TLS client handshake right after
connect, the server checked against ``--tls-hostname`` or the URI's host). The destination takes
connections from a :class:`TlsListener`, whose ``accept()`` hands out raw sockets at once, so that
a stranger cannot stall the accept loop, and secures each one, on the thread that handles it and
before it is classified, with :func:`secure_accepted` (handshake within a deadline, then authz).
The main channel, its return path (same socket) and every multifd channel are each one TLS
session (:class:`~livemig.transport.tls.ChannelSocket`).

A refused client is told why when that helps its operator: a plaintext *main channel* (it starts
with QEVM) gets a plaintext :class:`~livemig.migration.protocol.Refused` saying that this
destination takes TLS only, a client refused by authz gets one over TLS naming its DN. Other
refusals are the TLS alert (unknown CA, expired certificate, ...) or a bare close, as in QEMU.
"""

from __future__ import annotations

import socket

from ..migration.protocol import Refused, encode
from ..wire.constants import QEMU_VM_FILE_MAGIC
from .address import Address
from .sockets import AddressConnector, AddressListener, Connector, Listener
from .tls import Tls, TlsError, wrap_client, wrap_server


def _answer(exc: TlsError, head: bytes) -> bytes:
    """What a refused client is told (see the module doc); b"" for nothing."""
    if exc.check == "plaintext" and head[:4] == QEMU_VM_FILE_MAGIC.to_bytes(4, "big"):
        return encode(Refused("this destination accepts TLS connections only (it has --tls-creds) and this "
                              "connection is plaintext: give the source --tls-creds too"))
    if exc.check == "authz":
        return encode(Refused(f"TLS authorization refused: certificate DN '{exc.dn}' is not allowed by the "
                              "destination's --tls-authz"))
    return b""


class TlsConnector:
    """A :class:`~livemig.transport.sockets.Connector` whose connections are TLS clients of ``tls``,
    the server's certificate checked against ``tls.hostname`` or else ``hostname``."""

    def __init__(self, inner: Connector, tls: Tls, hostname: str) -> None:
        self.inner = inner
        self.tls = tls
        self.hostname = hostname

    def connect(self, timeout: float) -> socket.socket:
        """A connected TLS socket, handshake done within ``timeout`` s; TlsError naming the failed
        check (TransportError if the TCP connection itself fails)."""
        return wrap_client(self.inner.connect(timeout), self.tls, self.hostname, timeout)


class TlsListener:
    """A :class:`~livemig.transport.sockets.Listener` for TLS clients: ``accept()`` returns the raw
    connection; :func:`secure_accepted` does its handshake on the caller's thread."""

    def __init__(self, inner: Listener, tls: Tls) -> None:
        self.inner = inner
        self.tls = tls
        self.port = inner.port

    def accept(self, timeout: float) -> socket.socket | None:
        return self.inner.accept(timeout)

    def close(self) -> None:
        self.inner.close()


def secure_accepted(listener: Listener, sock: socket.socket, timeout: float) -> socket.socket:
    """``sock`` (a connection ``listener`` handed out) ready to be classified: with a
    :class:`TlsListener`, the TLS server handshake and authz done within ``timeout`` s (absolute,
    however slowly the bytes come) and the secured socket returned (it keeps ``sock``'s timeout;
    ``recv(4, MSG_PEEK)`` works on it); otherwise ``sock`` itself.

    Raises :class:`~livemig.transport.tls.TlsError` naming the check when the client is refused
    (plaintext, unknown CA, expired, no certificate, authz, timeout, ...); ``sock`` is then closed.
    """
    if not isinstance(listener, TlsListener):
        return sock
    return wrap_server(sock, listener.tls, timeout, _answer)


def tls_connector(address: Address, tls: Tls | None) -> Connector:
    """The connector of a source migrating to ``address``: TLS when ``tls`` is given."""
    plain = AddressConnector(address)
    return plain if tls is None else TlsConnector(plain, tls, address.host)


def tls_listener(address: Address, tls: Tls | None, channels: int) -> Listener:
    """The listener of a destination at ``address`` for ``channels`` multifd channels (+ main)."""
    plain = AddressListener(address, max(8, channels + 1))
    return plain if tls is None else TlsListener(plain, tls)
