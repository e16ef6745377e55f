"""TLS the QEMU way: option parsing, credentials, and every refusal over loopback with certificates
made in the test (tests/support/certs.py)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import pytest

from livemig.errors import ParameterError
from livemig.transport import tls as T
from livemig.transport.authz import AuthzSimple, subject_dn
from support.certs import NOW, Ca, name

CLIENT_DN = "CN=livemig-client,O=Example"


# --- options ---------------------------------------------------------------------------------------
def test_split_options_qemu_syntax() -> None:
    assert T.split_options("authz-simple,id=a0,identity=CN=c,,O=Ex,,L=Lon") == [
        ("qom-type", "authz-simple"), ("id", "a0"), ("identity", "CN=c,O=Ex,L=Lon")]
    assert T.split_options("tls-creds-x509,id=t,dir=/a,,b") == [("qom-type", "tls-creds-x509"), ("id", "t"),
                                                                 ("dir", "/a,b")]
    assert T.split_options("qom-type=authz-simple,id=x") == [("qom-type", "authz-simple"), ("id", "x")]
    for bad, words in (("authz-simple,id", "Invalid parameter 'id'"), ("", "Invalid parameter ''"),
                       ("authz-simple,id=a,", "Invalid parameter ''")):
        with pytest.raises(ParameterError, match=words):
            T.split_options(bad)


def test_parse_object() -> None:
    assert T.parse_object("tls-creds-x509,id=t0,dir=/d,endpoint=server,verify-peer=off") == \
        T.TlsCredsX509("t0", "/d", "server", False)
    assert T.parse_object("tls-creds-x509,id=t0,dir=/d") == T.TlsCredsX509("t0", "/d", "client", True)
    assert T.parse_object("tls-creds-psk,id=p,dir=/k,endpoint=client,username=alice") == \
        T.TlsCredsPsk("p", "/k", "client", "alice")
    assert T.parse_object(f"authz-simple,id=a,identity={CLIENT_DN.replace(',', ',,')}") == AuthzSimple("a", CLIENT_DN)


@pytest.mark.parametrize(("text", "words"), [
    ("tls-creds-anon,id=a", "invalid object type: tls-creds-anon"),
    ("tls-creds-x509,id=a,dir=/d,priority=NORMAL", "Property 'tls-creds-x509.priority' not found"),
    ("tls-creds-x509,dir=/d", "Parameter 'id' is missing"),
    ("tls-creds-x509,id=a", "Parameter 'dir' is missing"),
    ("authz-simple,id=a", "Parameter 'identity' is missing"),
    ("tls-creds-x509,id=a,dir=/d,endpoint=both", "'tls-creds-x509.endpoint' expects 'server' or 'client', not 'both'"),
    ("tls-creds-x509,id=a,dir=/d,verify-peer=maybe", "'tls-creds-x509.verify-peer' expects 'on' or 'off'"),
])
def test_parse_object_refusals(text: str, words: str) -> None:
    with pytest.raises(ParameterError, match=words):
        T.parse_object(text)


def test_resolve() -> None:
    objs = ["tls-creds-x509,id=srv,dir=/s,endpoint=server", "tls-creds-x509,id=cli,dir=/c",
            "tls-creds-x509,id=lax,dir=/s,endpoint=server,verify-peer=off",
            f"authz-simple,id=auth0,identity={CLIENT_DN.replace(',', ',,')}", "tls-creds-psk,id=psk,dir=/p"]
    tls = T.resolve(objs, "srv", None, "auth0", endpoint="server")
    assert tls is not None and tls.creds.id == "srv" and tls.authz == AuthzSimple("auth0", CLIENT_DN)
    tls = T.resolve(objs, "cli", "migration.example", endpoint="client")
    assert tls is not None and tls.hostname == "migration.example" and tls.authz is None
    assert T.resolve(objs, None) is None
    for args, words in [
        (("nope",), "No TLS credentials with id 'nope'"),
        (("auth0",), "No TLS credentials with id 'auth0'"),
        (("cli",), "Expected TLS credentials for a server endpoint: 'cli' has endpoint=client"),
        (("srv", None, "srv"), "No authz object with id 'srv'"),
        (("lax", None, "auth0"), "--tls-authz needs server credentials with verify-peer=on"),
        ((None, "h"), "--tls-hostname needs --tls-creds"),
        ((None, None, "auth0"), "--tls-authz needs --tls-creds"),
    ]:
        with pytest.raises(ParameterError, match=words):
            T.resolve(objs, *args, endpoint="server")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="duplicate property 'srv'"):
        T.resolve([*objs, "authz-simple,id=srv,identity=x"], "srv")
    with pytest.raises(T.TlsError, match="tls-creds-psk 'psk' cannot be used: Python 3.11's ssl module has no "
                                         "TLS-PSK") as info:
        T.resolve(objs, "psk", endpoint="client")
    assert info.value.check == "psk"


def test_read_psk(tmp_path: Path) -> None:
    creds = T.TlsCredsPsk("p", str(tmp_path), "client", "alice")
    with pytest.raises(T.TlsError, match="cannot read .*keys.psk"):
        T.read_psk(creds)
    (tmp_path / "keys.psk").write_text("qemu:00ff\nalice:0a0b0c\n")
    assert T.read_psk(creds) == b"\n\x0b\x0c" and T.read_psk(creds, "qemu") == b"\x00\xff"
    with pytest.raises(T.TlsError, match="has no key for user 'bob'"):
        T.read_psk(creds, "bob")
    (tmp_path / "keys.psk").write_text("alice:secretzz\n")
    with pytest.raises(T.TlsError, match="line 1: the key of 'alice' is not hex") as info:
        T.read_psk(creds)
    assert "secretzz" not in str(info.value)


def test_subject_dn_is_rfc4514_last_rdn_first() -> None:
    subject = ((("countryName", "GB"),), (("stateOrProvinceName", "London"),),
               (("organizationName", "Example, Inc."),), (("commonName", "#host+1 "),),
               (("organizationalUnitName", "a"), ("userId", "b")))
    assert subject_dn(subject) == r"OU=a+UID=b,CN=\#host\+1\ ,O=Example\, Inc.,ST=London,C=GB"


# --- handshakes over loopback ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


def _server(d: Path, verify_peer: bool = True, authz: str | None = None) -> T.Tls:
    objs = [f"tls-creds-x509,id=s,dir={d},endpoint=server,verify-peer={'on' if verify_peer else 'off'}"]
    if authz is not None:
        objs.append(f"authz-simple,id=auth0,identity={authz.replace(',', ',,')}")
    tls = T.resolve(objs, "s", None, "auth0" if authz is not None else None, endpoint="server")
    assert tls is not None
    return tls


def _client(d: Path, hostname: str | None = None, verify_peer: bool = True) -> T.Tls:
    tls = T.resolve([f"tls-creds-x509,id=c,dir={d},verify-peer={'on' if verify_peer else 'off'}"], "c",
                    hostname, endpoint="client")
    assert tls is not None
    return tls


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        c = socket.create_connection(lst.getsockname(), timeout=10)
        s, _ = lst.accept()
        s.settimeout(10)
    return s, c


def exchange(server: T.Tls | None, client: T.Tls | None, hostname: str = "127.0.0.1",
             client_sends: bytes = b"") -> tuple[object, object]:
    """Handshake both ends, then server -> "pong", client -> "ping". Returns (server, client)
    outcomes: the TLS version string, or the TlsError (or other exception) that ended that side."""
    s, c = _pair()
    out: dict[str, object] = {}

    def serve() -> None:
        try:
            ss = T.wrap_server(s, server, timeout=5) if server else s
            ss.sendall(b"pong")
            assert ss.recv(4) == b"ping"
            out["server"] = ss.version() if isinstance(ss, ssl.SSLSocket) else "plain"
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            out["server"] = exc
        finally:
            s.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        if client is None:
            c.sendall(client_sends or b"QEVM\x00\x00\x00\x03")
            out["client"] = "plain"
        else:
            cs = T.wrap_client(c, client, hostname, timeout=5)
            try:  # read first: a TLS 1.3 server's refusal of our certificate arrives as an alert here
                got = cs.recv(4)
            except (ssl.SSLError, OSError) as exc:
                raise T.explain(exc, "the server") from exc
            if got != b"pong":
                raise T.TlsError("closed", f"the server closed the connection ({got!r})")
            cs.sendall(b"ping")
            out["client"] = cs.version()
    except Exception as exc:  # noqa: BLE001
        out["client"] = exc
    finally:
        c.close()
        t.join(10)
    return out["server"], out["client"]


def refused(outcome: object, check: str, words: str) -> None:
    assert isinstance(outcome, T.TlsError), outcome
    assert outcome.check == check, (outcome.check, str(outcome))
    assert words in str(outcome), str(outcome)


def test_tls13_exchange_with_authz_passing(ca: Ca, tmp_path: Path) -> None:
    srv, cli = ca.server_dir(tmp_path / "s"), ca.client_dir(tmp_path / "c")
    assert exchange(_server(srv, authz=CLIENT_DN), _client(cli)) == ("TLSv1.3", "TLSv1.3")


def test_tls_hostname_overrides_the_uri_host(ca: Ca, tmp_path: Path) -> None:
    srv = ca.server_dir(tmp_path / "s", hosts=("migration.example",))
    cli = ca.client_dir(tmp_path / "c")
    assert exchange(_server(srv), _client(cli, hostname="migration.example")) == ("TLSv1.3", "TLSv1.3")
    _, client = exchange(_server(srv), _client(cli))  # the URI's host, 127.0.0.1, is not in the certificate
    refused(client, "hostname", "does not match the IP address")


def test_plaintext_client_is_refused(ca: Ca, tmp_path: Path) -> None:
    server, _ = exchange(_server(ca.server_dir(tmp_path / "s")), None)
    refused(server, "plaintext", "sent plaintext (b'QEVM'...), not a TLS ClientHello")
    server, _ = exchange(_server(ca.server_dir(tmp_path / "s")), None, client_sends=b"GET / HTTP/1.0\r\n\r\n")
    refused(server, "plaintext", "b'GET '")


def test_plaintext_server_is_refused(ca: Ca, tmp_path: Path) -> None:
    _, client = exchange(None, _client(ca.client_dir(tmp_path / "c")))
    refused(client, "closed", "closed the connection during the handshake (is it listening without TLS")


def test_wrong_ca_is_refused_both_ways(ca: Ca, tmp_path: Path) -> None:
    other = Ca("another CA")
    srv, cli = ca.server_dir(tmp_path / "s"), ca.client_dir(tmp_path / "c")
    server, client = exchange(_server(other.server_dir(tmp_path / "os", trust=ca)), _client(cli))
    refused(client, "unknown-issuer", "not signed by our CA (unknown issuer)")
    refused(server, "unknown-issuer", "does not know the CA of our certificate")
    server, client = exchange(_server(srv), _client(other.client_dir(tmp_path / "oc", trust=ca)))
    refused(server, "unknown-issuer", "not signed by our CA (unknown issuer)")
    refused(client, "unknown-issuer", "does not know the CA of our certificate")


def test_expired_certificates_are_refused(ca: Ca, tmp_path: Path) -> None:
    old = {"not_before": NOW - dt.timedelta(days=2), "not_after": NOW - dt.timedelta(hours=1)}
    srv, cli = ca.server_dir(tmp_path / "s"), ca.client_dir(tmp_path / "c")
    _, client = exchange(_server(ca.server_dir(tmp_path / "os", **old)), _client(cli))
    refused(client, "expired", "its certificate has expired")
    server, client = exchange(_server(srv), _client(ca.client_dir(tmp_path / "oc", **old)))
    refused(server, "expired", "its certificate has expired")
    refused(client, "expired", "it says our certificate has expired")


def test_dn_outside_authz_is_refused(ca: Ca, tmp_path: Path) -> None:
    srv = ca.server_dir(tmp_path / "s")
    cli = ca.client_dir(tmp_path / "c", subject=name(("O", "Example"), ("CN", "intruder")))
    server, client = exchange(_server(srv, authz=CLIENT_DN), _client(cli))
    refused(server, "authz", "certificate DN 'CN=intruder,O=Example' is not the identity of authz-simple 'auth0'")
    assert isinstance(client, T.TlsError)  # the server hung up before answering


def test_client_without_certificate_is_refused_when_verify_peer(ca: Ca, tmp_path: Path) -> None:
    srv, cli = ca.server_dir(tmp_path / "s"), ca.client_dir(tmp_path / "c")
    (cli / "client-cert.pem").unlink()
    server, client = exchange(_server(srv), _client(cli))
    refused(server, "no-certificate", "sent no client certificate")
    refused(client, "no-certificate", "requires a client certificate")
    assert exchange(_server(srv, verify_peer=False), _client(cli)) == ("TLSv1.3", "TLSv1.3")


def test_client_verify_peer_off_accepts_any_server(tmp_path: Path) -> None:
    srv = Ca("stranger").server_dir(tmp_path / "s", hosts=("elsewhere",))
    cli = Ca().client_dir(tmp_path / "c")
    assert exchange(_server(srv, verify_peer=False), _client(cli, verify_peer=False)) == ("TLSv1.3", "TLSv1.3")


def test_tls12_peer_is_refused(ca: Ca, tmp_path: Path) -> None:
    tls = _client(ca.client_dir(tmp_path / "c"))
    tls.context().minimum_version = ssl.TLSVersion.TLSv1_2
    tls.context().maximum_version = ssl.TLSVersion.TLSv1_2
    server, client = exchange(_server(ca.server_dir(tmp_path / "s")), tls)
    refused(server, "protocol-version", "does not offer TLS 1.3")
    refused(client, "protocol-version", "does not accept TLS 1.3")


@pytest.mark.parametrize("sends", [b"", b"\x16\x03"])
def test_silent_or_stalled_client_hits_the_handshake_deadline(ca: Ca, tmp_path: Path, sends: bytes) -> None:
    s, c = _pair()
    try:
        c.sendall(sends)
        with pytest.raises(T.TlsError, match="not finished within 0.2 s") as info:
            T.wrap_server(s, _server(ca.server_dir(tmp_path / "s")), timeout=0.2)
        assert info.value.check == "timeout"
    finally:
        s.close()
        c.close()


def test_missing_or_mismatched_credentials(ca: Ca, tmp_path: Path) -> None:
    srv = ca.server_dir(tmp_path / "s")
    (srv / "server-key.pem").unlink()
    with pytest.raises(T.TlsError, match="server-key.pem is missing") as info:
        _server(srv).context()
    assert info.value.check == "credentials"
    (srv / "server-key.pem").write_bytes(ca.issue(name(("CN", "x")))[1])
    with pytest.raises(T.TlsError, match="cannot load server-cert.pem with server-key.pem"):
        _server(srv).context()
