"""TLS on migration channels, configured the QEMU way, through Python's :mod:`ssl`.

Options as QEMU spells them::

    --object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client,verify-peer=on|off
    --object authz-simple,id=ID,identity=DN          (DN commas doubled: CN=a,,O=b)
    --tls-creds ID  --tls-hostname NAME  --tls-authz ID

DIR holds QEMU's file names: ``ca-cert.pem``, ``server-cert.pem`` + ``server-key.pem`` (server),
``client-cert.pem`` + ``client-key.pem`` (client; optional unless the server verifies clients).
``verify-peer`` defaults to on, as in QEMU: the server asks for and verifies a client certificate,
the client verifies the server's certificate and its hostname (``--tls-hostname``, else the host of
the migration URI). TLS 1.3 is the minimum on both sides.

``tls-creds-psk`` (``keys.psk`` lines ``username:hexkey``) is parsed but refused when used:
Python 3.11's ``ssl`` has no TLS-PSK (``SSLContext.set_psk_*_callback`` came in 3.13).

Sockets are :class:`ChannelSocket` (peek, first-read errors explained); connectors, listeners and
the destination's per-connection handshake are in :mod:`livemig.transport.secure`.

Every failure is a :class:`TlsError` (a TransportError) whose ``check`` names what failed:
``plaintext``, ``unknown-issuer``, ``hostname``, ``expired``, ``not-yet-valid``, ``no-certificate``,
``authz``, ``protocol-version``, ``refused-by-peer``, ``closed``, ``timeout``, ``config``,
``credentials`` or ``psk``.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from ..errors import ParameterError, TransportError
from .authz import AuthzSimple, Subject, subject_dn

#: QEMU's file names in a tls-creds-x509 directory (crypto/tlscredsx509.h)
CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
PSK_FILE = "keys.psk"
#: first byte of every TLS handshake record (RFC 8446 section 5.1, ContentType handshake)
TLS_HANDSHAKE = 0x16


class TlsError(TransportError):
    """A TLS setup or handshake failure; ``check`` names the check that failed (see the module doc);
    ``dn``: the refused client's certificate DN (check ``authz``)."""

    def __init__(self, check: str, text: str, dn: str = "") -> None:
        super().__init__(text)
        self.check = check
        self.dn = dn


# --- QEMU's option syntax and objects ------------------------------------------------------------
def split_options(text: str, implied: str = "qom-type") -> list[tuple[str, str]]:
    """``type,key=value,...`` -> ``[(implied, type), (key, value), ...]``; ``,,`` is a literal comma.

    The first item may omit its key (it gets ``implied``); a value may contain ``=``.
    ParameterError on an empty item or a later item without ``=``.
    """
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    out = []
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n or not item:
                raise ParameterError(f"Invalid parameter '{item}' in '{text}': expected key=value")
            key, value = implied, item
        out.append((key, value))
    return out


def _bool(obj: str, key: str, value: str) -> bool:
    for word, b in (("on", True), ("yes", True), ("true", True), ("off", False), ("no", False), ("false", False)):
        if value == word:
            return b
    raise ParameterError(f"Parameter '{obj}.{key}' expects 'on' or 'off', not '{value}'")


@dataclass(frozen=True)
class TlsCredsX509:
    """``tls-creds-x509``: certificates in ``dir`` under QEMU's file names."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True


@dataclass(frozen=True)
class TlsCredsPsk:
    """``tls-creds-psk``: keys in ``dir``/keys.psk; ``username`` is the client's identity."""

    id: str
    dir: str
    endpoint: str = "client"
    username: str = "qemu"


Object = TlsCredsX509 | TlsCredsPsk | AuthzSimple
_PROPS = {"tls-creds-x509": ("dir", "endpoint", "verify-peer"), "tls-creds-psk": ("dir", "endpoint", "username"),
          "authz-simple": ("identity",)}


def parse_object(text: str) -> Object:
    """One ``--object`` argument. ParameterError naming an unknown type or property, a missing
    ``id``/``dir``/``identity``, or a bad ``endpoint``/``verify-peer`` value (QEMU's wording)."""
    opts = split_options(text)
    kind = opts[0][1]
    if kind not in _PROPS:
        raise ParameterError(f"invalid object type: {kind} (livemig knows {', '.join(_PROPS)})")
    props: dict[str, str] = {}
    for key, value in opts[1:]:
        if key != "id" and key not in _PROPS[kind]:
            raise ParameterError(f"Property '{kind}.{key}' not found (known: id, {', '.join(_PROPS[kind])})")
        props[key] = value
    for need in ("id", *(("identity",) if kind == "authz-simple" else ("dir",))):
        if not props.get(need):
            raise ParameterError(f"Parameter '{need}' is missing in --object {kind}")
    if kind == "authz-simple":
        return AuthzSimple(props["id"], props["identity"])
    endpoint = props.get("endpoint", "client")
    if endpoint not in ("server", "client"):
        raise ParameterError(f"Parameter '{kind}.endpoint' expects 'server' or 'client', not '{endpoint}'")
    if kind == "tls-creds-psk":
        return TlsCredsPsk(props["id"], props["dir"], endpoint, props.get("username", "qemu"))
    return TlsCredsX509(props["id"], props["dir"], endpoint, _bool(kind, "verify-peer", props.get("verify-peer", "on")))


def read_psk(creds: TlsCredsPsk, username: str | None = None) -> bytes:
    """The key of ``username`` (default: the creds' own) from ``dir``/keys.psk (``username:hexkey``
    lines). TlsError (check ``credentials``) naming the file if it is missing, malformed or lacks the
    user; the key itself is never quoted."""
    path = os.path.join(creds.dir, PSK_FILE)
    user = creds.username if username is None else username
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TlsError("credentials", f"cannot read {path}: {exc.strerror}") from exc
    for n, line in enumerate(lines, 1):
        name, colon, key = line.partition(":")
        if not colon:
            raise TlsError("credentials", f"{path} line {n}: expected username:hexkey")
        if name == user:
            try:
                return bytes.fromhex(key)
            except ValueError:
                raise TlsError("credentials", f"{path} line {n}: the key of '{user}' is not hex") from None
    raise TlsError("credentials", f"{path} has no key for user '{user}'")


@dataclass(frozen=True)
class Tls:
    """Resolved TLS settings for one side: credentials, the hostname to check, the authz object."""

    creds: TlsCredsX509
    hostname: str | None = None
    authz: AuthzSimple | None = None
    _ctx: list[ssl.SSLContext] = field(default_factory=list, compare=False, repr=False)

    def context(self) -> ssl.SSLContext:
        """The SSLContext (built once); TlsError (``credentials``) naming a missing or bad file."""
        if not self._ctx:
            self._ctx.append(_server_context(self.creds) if self.creds.endpoint == "server"
                             else _client_context(self.creds))
        return self._ctx[0]


def resolve(objects: Iterable[str], tls_creds: str | None, tls_hostname: str | None = None,
            tls_authz: str | None = None, endpoint: str = "server") -> Tls | None:
    """``--object`` arguments plus ``--tls-creds/--tls-hostname/--tls-authz`` -> :class:`Tls`, or
    None without ``--tls-creds``. ``endpoint``: what this side is (``server`` = incoming).

    ParameterError for a duplicate id, an unknown or wrongly typed id, creds of the other endpoint,
    ``--tls-hostname``/``--tls-authz`` without creds, authz on a client or without verify-peer.
    TlsError (check ``psk``) for tls-creds-psk.
    """
    registry: dict[str, Object] = {}
    for text in objects:
        obj = parse_object(text)
        if obj.id in registry:
            raise ParameterError(f"attempt to add duplicate property '{obj.id}' to object (type 'container')")
        registry[obj.id] = obj
    if tls_creds is None:
        for opt, value in (("--tls-hostname", tls_hostname), ("--tls-authz", tls_authz)):
            if value is not None:
                raise ParameterError(f"{opt} needs --tls-creds")
        return None
    creds = registry.get(tls_creds)
    if isinstance(creds, TlsCredsPsk):
        raise TlsError("psk", f"tls-creds-psk '{tls_creds}' cannot be used: Python 3.11's ssl module has "
                              "no TLS-PSK support (it came in Python 3.13); use tls-creds-x509")
    if not isinstance(creds, TlsCredsX509):
        raise ParameterError(f"No TLS credentials with id '{tls_creds}'")
    if creds.endpoint != endpoint:
        raise ParameterError(f"Expected TLS credentials for a {endpoint} endpoint: '{tls_creds}' has "
                             f"endpoint={creds.endpoint}")
    authz = None
    if tls_authz is not None:
        found = registry.get(tls_authz)
        if not isinstance(found, AuthzSimple):
            raise ParameterError(f"No authz object with id '{tls_authz}'")
        if endpoint != "server" or not creds.verify_peer:
            raise ParameterError("--tls-authz needs server credentials with verify-peer=on (it checks the "
                                 "client certificate)")
        authz = found
    return Tls(creds, tls_hostname, authz)


# --- contexts --------------------------------------------------------------------------------------
def _path(creds: TlsCredsX509, name: str) -> str:
    path = os.path.join(creds.dir, name)
    if not os.path.isfile(path):
        raise TlsError("credentials", f"tls-creds-x509 '{creds.id}': {path} is missing")
    return path


def _load(ctx: ssl.SSLContext, creds: TlsCredsX509, cert: str | None, key: str | None, ca: bool) -> None:
    what = ""
    try:
        if ca:
            what = CA_CERT
            ctx.load_verify_locations(_path(creds, CA_CERT))
        if cert and key:
            what = f"{cert} with {key}"
            ctx.load_cert_chain(_path(creds, cert), _path(creds, key))
    except ssl.SSLError as exc:
        raise TlsError("credentials", f"tls-creds-x509 '{creds.id}': cannot load {what} from {creds.dir}: "
                                      f"{exc.reason or exc}") from exc


def _server_context(creds: TlsCredsX509) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslsocket_class = ChannelSocket
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # see ChannelSocket
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0  # no session resumption: every channel does a full handshake
    _load(ctx, creds, SERVER_CERT, SERVER_KEY, ca=creds.verify_peer)
    ctx.verify_mode = ssl.CERT_REQUIRED if creds.verify_peer else ssl.CERT_NONE
    return ctx


def _client_context(creds: TlsCredsX509) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslsocket_class = ChannelSocket
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # see ChannelSocket
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    has_cert = os.path.isfile(os.path.join(creds.dir, CLIENT_CERT))
    _load(ctx, creds, CLIENT_CERT if has_cert else None, CLIENT_KEY, ca=creds.verify_peer)
    if not creds.verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- handshakes ------------------------------------------------------------------------------------
_VERIFY = {  # OpenSSL X509_V_ERR_* codes (x509_vfy.h) -> check, words
    10: ("expired", "its certificate has expired"),
    9: ("not-yet-valid", "its certificate is not valid yet"),
    62: ("hostname", "its certificate does not match the hostname"),
    64: ("hostname", "its certificate does not match the IP address"),
    **dict.fromkeys((2, 18, 19, 20, 21), ("unknown-issuer", "its certificate is not signed by our CA "
                                                            "(unknown issuer)")),
}
_REASONS = {  # OpenSSL reason codes of errors and of alerts received from the peer
    "WRONG_VERSION_NUMBER": ("plaintext", "it does not speak TLS (plaintext peer?)"),
    "HTTP_REQUEST": ("plaintext", "it sent an HTTP request, not TLS"),
    "RECORD_LAYER_FAILURE": ("plaintext", "it does not speak TLS (plaintext peer?)"),
    "PACKET_LENGTH_TOO_LONG": ("plaintext", "it does not speak TLS (plaintext peer?)"),
    "UNSUPPORTED_PROTOCOL": ("protocol-version", "it does not offer TLS 1.3"),
    "TLSV1_ALERT_PROTOCOL_VERSION": ("protocol-version", "it does not accept TLS 1.3"),
    "TLSV1_ALERT_UNKNOWN_CA": ("unknown-issuer", "it does not know the CA of our certificate (wrong CA)"),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": ("expired", "it says our certificate has expired"),
    "SSLV3_ALERT_BAD_CERTIFICATE": ("refused-by-peer", "it refused our certificate"),
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": ("no-certificate", "it requires a client certificate and we sent none"),
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": ("no-certificate", "it sent no client certificate (verify-peer=on)"),
}


def explain(exc: BaseException, peer: str) -> TlsError:
    """A TlsError naming the check behind an ``ssl``/socket error from a handshake or, in TLS 1.3,
    from the client's first read (where a server's refusal of the client certificate shows)."""
    if isinstance(exc, TlsError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        check, words = _VERIFY.get(exc.verify_code, ("refused", f"its certificate failed: {exc.verify_message}"))
        return TlsError(check, f"TLS refused {peer}: {words} ({exc.verify_message})")
    if isinstance(exc, ssl.SSLEOFError | ConnectionError | EOFError) or (
            isinstance(exc, ssl.SSLError) and exc.reason == "UNEXPECTED_EOF_WHILE_READING"):
        return TlsError("closed", f"TLS with {peer} failed: it closed the connection during the handshake "
                                  "(is it listening without TLS, or did it refuse us?)")
    if isinstance(exc, ssl.SSLError):
        check, words = _REASONS.get(exc.reason or "", ("refused", f"TLS error {exc.reason or exc}"))
        return TlsError(check, f"TLS with {peer} failed: {words}")
    return TlsError("closed", f"TLS with {peer} failed: {exc}")


class ChannelSocket(ssl.SSLSocket):
    """The SSLSocket of a migration channel (every context of this module makes these).

    * ``recv(n, MSG_PEEK)`` works: :class:`ssl.SSLSocket` refuses flags, and a destination may
      classify a connection by peeking its first bytes. Peeked bytes are kept and handed out first
      by the next ``recv``/``recv_into``.
    * The client's first read turns a TLS alert, a reset or a close into a :class:`TlsError`
      naming the check: in TLS 1.3 a server's refusal of the client's certificate shows only there.
    * ``shutdown()`` shuts the connection down but keeps the TLS session (:class:`ssl.SSLSocket`
      drops it, and later writes would go out as plaintext): a destination that shuts its read side
      to wake its reader still sends its error report over TLS. For that, the contexts set
      ``OP_IGNORE_UNEXPECTED_EOF`` (OpenSSL 3 otherwise makes an EOF without close_notify fatal to
      the session); a truncated stream is still caught, by the migration's own framing (EOF
      record, packet sizes, handover messages).

    One TLS session must not be read in one thread while written in another: livemig's channels
    are each read or written by one thread at a time.
    """

    _ahead = b""
    _answered = False

    def _first_read(self, read: Callable[[], bytes | int]) -> bytes | int:
        if self.server_side or self._answered:
            return read()
        try:
            got = read()
        except TimeoutError:
            raise
        except (ssl.SSLError, OSError) as exc:
            raise explain(exc, _peer_name(self)) from exc
        if not got:
            raise TlsError("closed", f"TLS with {_peer_name(self)}: it closed the connection right after the "
                                     "handshake without a word (it refused or dropped us; see its log)")
        self._answered = True
        return got

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if flags & ~socket.MSG_PEEK:
            raise ValueError(f"flags {flags:#x} not supported on a TLS channel (only MSG_PEEK)")
        if flags:
            if len(self._ahead) < buflen:
                more = self._first_read(lambda: super(ChannelSocket, self).recv(buflen - len(self._ahead)))
                self._ahead += cast(bytes, more)
            return self._ahead[:buflen]
        if self._ahead:
            out, self._ahead = self._ahead[:buflen], self._ahead[buflen:]
            return out
        return cast(bytes, self._first_read(lambda: super(ChannelSocket, self).recv(buflen)))

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if flags:
            raise ValueError(f"flags {flags:#x} not supported by recv_into on a TLS channel")
        if self._ahead:
            view = memoryview(buffer).cast("B")
            n = min(len(self._ahead), nbytes or view.nbytes, view.nbytes)
            view[:n] = self._ahead[:n]
            self._ahead = self._ahead[n:]
            return n
        return cast(int, self._first_read(lambda: super(ChannelSocket, self).recv_into(buffer, nbytes)))

    def bulk_reader(self) -> Callable[[int, memoryview], int]:
        """``read(n, buffer) -> bytes read`` (0 at the end) for bulk data: the session's own read,
        without the Python layers of ``recv_into`` on every TLS record (at most 16 KiB each), once
        nothing peeked is pending and the client's first read was checked; else ``recv_into``."""
        sslobj = getattr(self, "_sslobj", None)  # SSLSocket's session (CPython's _ssl), None once closed
        if self._ahead or not (self.server_side or self._answered) or sslobj is None:
            return lambda n, buffer: self.recv_into(buffer, n)
        return cast(Callable[[int, memoryview], int], sslobj.read)

    def shutdown(self, how: int) -> None:
        socket.socket.shutdown(self, how)


def _wait(sock: socket.socket, write: bool, deadline: float, peer: str, timeout: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        r, w, _ = select.select([] if write else [sock], [sock] if write else [], [], left)
        if r or w:
            return
    raise TlsError("timeout", f"TLS handshake with {peer} not finished within {timeout:g} s")


def _handshake(ssock: ssl.SSLSocket, deadline: float, peer: str, timeout: float) -> None:
    while True:
        try:
            ssock.do_handshake()
            return
        except ssl.SSLWantReadError:
            _wait(ssock, False, deadline, peer, timeout)
        except ssl.SSLWantWriteError:
            _wait(ssock, True, deadline, peer, timeout)
        except (ssl.SSLError, OSError) as exc:
            raise explain(exc, peer) from exc


def _peer_name(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "the peer"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else (str(name) or "the peer")


#: what a refused client is told before the connection closes: (the error, the first bytes it sent)
#: -> bytes to send it (b"" = nothing). Plaintext refusals are sent in plaintext, authz refusals over TLS.
Answer = Callable[[TlsError, bytes], bytes]
#: longest wait for a refused peer to close its side, so that our last bytes (an answer, a TLS
#: alert) reach it instead of being lost to a TCP reset
LINGER = 0.5


def _close_gently(sock: socket.socket, tell: bytes, deadline: float) -> None:
    """Send ``tell`` (plain or TLS, as ``sock`` is), send FIN, read and drop what the peer still
    sends until it closes (at most LINGER s, never past ``deadline``), close. A socket closed with
    unread input sends an RST, and the peer may lose our last bytes to it."""
    try:
        if tell:
            sock.settimeout(max(0.05, min(LINGER, deadline - time.monotonic())))
            sock.sendall(tell)
        socket.socket.shutdown(sock, socket.SHUT_WR)
        until = min(time.monotonic() + LINGER, deadline)
        while (left := until - time.monotonic()) > 0:
            r, _, _ = select.select([sock], [], [], left)
            if not r or not socket.socket.recv(sock, 65536):
                break
    except (OSError, ValueError):
        pass
    finally:
        sock.close()


def _wrap(sock: socket.socket, tls: Tls, timeout: float, hostname: str | None,
          answer: Answer | None = None) -> ssl.SSLSocket:
    peer = _peer_name(sock)
    deadline = time.monotonic() + timeout
    server = hostname is None
    old = sock.gettimeout()
    try:
        if server:
            head = _first_bytes(sock, deadline, peer, timeout)
            if head[0] != TLS_HANDSHAKE:
                exc = TlsError("plaintext", f"TLS refused {peer}: it sent plaintext ({head[:4]!r}...), not a TLS "
                                            "ClientHello; the other side needs --tls-creds too")
                _close_gently(sock, answer(exc, head) if answer else b"", deadline)
                raise exc
        sock.setblocking(False)
        ssock = tls.context().wrap_socket(sock, server_side=server, server_hostname=hostname,
                                          do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        _handshake(ssock, deadline, peer, timeout)
    except BaseException:
        if server:
            _close_gently(ssock, b"", deadline)  # lets our TLS alert reach the client
        ssock.close()
        raise
    if tls.authz is not None:
        subject = (ssock.getpeercert() or {}).get("subject", ())
        dn = subject_dn(cast(Subject, subject)) if isinstance(subject, tuple) else ""
        if not tls.authz.is_allowed(dn):
            exc = TlsError("authz", f"TLS authorization refused {peer}: certificate DN '{dn}' is not the "
                                    f"identity of authz-simple '{tls.authz.id}'", dn)
            _close_gently(ssock, answer(exc, b"") if answer else b"", deadline)
            raise exc
    ssock.settimeout(old)
    return ssock


def _first_bytes(sock: socket.socket, deadline: float, peer: str, timeout: float) -> bytes:
    """The first bytes the client sent (peeked: they stay in the socket); TlsError if none came."""
    _wait(sock, False, deadline, peer, timeout)
    try:
        first = sock.recv(8, socket.MSG_PEEK)
    except OSError as exc:
        raise explain(exc, peer) from exc
    if not first:
        raise TlsError("closed", f"TLS with {peer} failed: it closed the connection before the handshake")
    return first


def wrap_server(sock: socket.socket, tls: Tls, timeout: float, answer: Answer | None = None) -> ssl.SSLSocket:
    """TLS server side on an accepted ``sock``, handshake done within ``timeout`` s (absolute).

    Refuses a peer that sends plaintext (its first byte is not a TLS handshake record), fails a
    check, or (with authz) whose certificate DN is not allowed; a refused peer that sent plaintext
    or was refused by authz is first sent ``answer(error, first bytes)``. ``sock`` is consumed: use
    the returned socket (a :class:`ChannelSocket`; it keeps ``sock``'s timeout); on failure the
    connection is closed. Raises TlsError naming the check.
    """
    return _wrap(sock, tls, timeout, None, answer)


def wrap_client(sock: socket.socket, tls: Tls, hostname: str, timeout: float) -> ssl.SSLSocket:
    """TLS client side on a connected ``sock``; checks the server certificate against
    ``tls.hostname`` or else ``hostname`` (the host of the migration URI). Handshake within
    ``timeout`` s; ``sock`` is consumed, and closed on failure. In TLS 1.3 a server's refusal of
    *our* certificate shows on the first read: pass that error through :func:`explain`.
    Raises TlsError naming the check."""
    return _wrap(sock, tls, timeout, tls.hostname or hostname)
