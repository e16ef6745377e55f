"""The TLS options of ``livemig migrate`` and ``livemig incoming``, spelled as QEMU spells them.

::

    --object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client,verify-peer=on|off   (repeatable)
    --object authz-simple,id=ID,identity=DN
    --tls-creds ID  --tls-hostname NAME  --tls-authz ID

Everything is checked (objects, ids, endpoints, the certificate files loaded) before a guest is
created or a socket opened: :func:`tls_from_args` raises ParameterError naming what is wrong. The
meaning of each option is in :mod:`livemig.transport.tls`.
"""

from __future__ import annotations

import argparse
import ipaddress
import re

from ..errors import ParameterError
from ..transport.address import Address
from ..transport.tls import Tls, TlsCredsX509, TlsError, parse_object, resolve


def add_tls_options(p: argparse.ArgumentParser, source: bool) -> None:
    """Register the TLS options (``source``: livemig migrate, else livemig incoming)."""
    g = p.add_argument_group("TLS (QEMU's options; README, \"Trust\")")
    g.add_argument("--object", action="append", default=[], metavar="TYPE,id=ID,...",
                   help="tls-creds-x509,id=ID,dir=DIR,endpoint=server|client,verify-peer=on|off (DIR holds "
                        "ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem)"
                        + ("" if source else "; authz-simple,id=ID,identity=DN (commas in DN doubled)")
                        + "; repeatable")
    g.add_argument("--tls-creds", metavar="ID", help="TLS on every channel with the tls-creds-x509 object ID "
                   f"(endpoint={'client' if source else 'server'})")
    if source:
        g.add_argument("--tls-hostname", metavar="NAME",
                       help="the name the destination's certificate must carry (default: the URI's host)")
    else:
        g.add_argument("--tls-authz", metavar="ID",
                       help="admit only clients whose certificate DN the authz-simple object ID allows")


def _checked(tls: Tls) -> Tls:
    try:
        tls.context()  # loads every file now: a missing or bad one is a bad option, not a failed migration
    except TlsError as exc:
        raise ParameterError(f"--tls-creds {tls.creds.id}: {exc}") from exc
    return tls


def _lower(text: str) -> str:
    """QEMU's capitalised sentence in the option errors' lower-case style (``Property`` -> ``property``)."""
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def _option_error(exc: ParameterError, args: argparse.Namespace, side: str) -> ParameterError:
    """``exc`` of :func:`livemig.transport.tls.resolve`, reworded to name the option that was typed:
    ``--tls-creds tls9: no --object tls-creds-x509 with id 'tls9'``."""
    text = str(exc)
    if m := re.fullmatch(r"attempt to add duplicate property '(.*)' to object .*", text):
        given = [o for o in args.object if re.search(rf"(?:^|,)id={re.escape(m.group(1))}(?:,|$)", o)]
        return ParameterError(f"--object {given[-1] if given else m.group(1)}: duplicate id '{m.group(1)}'")
    if m := re.fullmatch(r"No TLS credentials with id '(.*)'", text):
        return ParameterError(f"--tls-creds {m.group(1)}: no --object tls-creds-x509 with id '{m.group(1)}'")
    if m := re.fullmatch(r"Expected TLS credentials for a (\w+) endpoint: '(.*)' has endpoint=(\w+)", text):
        return ParameterError(f"--tls-creds {m.group(2)}: the --object tls-creds-x509 '{m.group(2)}' has "
                              f"endpoint={m.group(3)}; the {side} needs endpoint={m.group(1)}")
    if m := re.fullmatch(r"No authz object with id '(.*)'", text):
        return ParameterError(f"--tls-authz {m.group(1)}: no --object authz-simple with id '{m.group(1)}'")
    return ParameterError(_lower(text))


def tls_from_args(args: argparse.Namespace, source: bool, address: Address | None) -> Tls | None:
    """The checked TLS settings of a command line, or None without ``--tls-creds``.

    ``address``: where the source migrates to (its host is the default ``--tls-hostname``; a unix
    socket has none, so verify-peer=on needs ``--tls-hostname``). ParameterError naming the problem.
    """
    for text in args.object:  # each object alone first: an error names the --object it is in
        try:
            parse_object(text)
        except ParameterError as exc:
            raise ParameterError(f"--object {text}: {_lower(str(exc))}") from exc
    try:
        tls = resolve(args.object, args.tls_creds, getattr(args, "tls_hostname", None),
                      getattr(args, "tls_authz", None), endpoint="client" if source else "server")
    except TlsError as exc:  # tls-creds-psk
        raise ParameterError(f"--tls-creds {args.tls_creds}: {exc}") from exc
    except ParameterError as exc:
        raise _option_error(exc, args, "source" if source else "destination") from exc
    if tls is None:
        return None
    if source and tls.creds.verify_peer and not tls.hostname and address is not None and address.scheme == "unix":
        raise ParameterError(f"--tls-creds over {address}: the URI has no host name to check the destination's "
                             "certificate against; give --tls-hostname")
    return _checked(tls)


def local_server_args(tls: Tls | None) -> list[str]:
    """``livemig incoming`` options for ``migrate --local``'s destination: the source's certificate
    directory as a server endpoint (it must hold server-cert.pem and server-key.pem as well)."""
    if tls is None:
        return []
    creds = tls.creds
    server = TlsCredsX509(creds.id, creds.dir, "server", creds.verify_peer)
    try:
        Tls(server).context()
    except TlsError as exc:
        raise ParameterError(f"--local with --tls-creds: the local destination uses the same directory as a "
                             f"server: {exc}") from exc
    verify = "on" if creds.verify_peer else "off"
    return ["--object", f"tls-creds-x509,id={creds.id},dir={creds.dir.replace(',', ',,')},endpoint=server,"
                        f"verify-peer={verify}", "--tls-creds", creds.id]


def is_loopback(address: Address) -> bool:
    """True for a unix socket or a TCP address only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if address.scheme == "unix" or address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False
