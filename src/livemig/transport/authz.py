"""Who may connect: QEMU's ``authz-simple`` object and the distinguished name it is matched against.

QEMU authorizes a TLS client by the distinguished name (DN) of its x509 certificate: the TLS
session takes the peer certificate's subject as GnuTLS prints it (``gnutls_x509_crt_get_dn2``, an
RFC 4514 string: the last RDN of the certificate first, ``CN=...,O=...,C=...`` for the usual
C/O/CN certificate) and ``authz-simple`` allows it when it equals its ``identity`` exactly (QEMU's
``authz/simple.c``, ``g_str_equal``). :func:`subject_dn` builds the same string from the subject
that Python's :meth:`ssl.SSLSocket.getpeercert` returns.

On a command line the DN's commas are doubled, QEMU's option escape:
``--object authz-simple,id=auth0,identity=CN=livemig-client,,O=Example``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Python's (OpenSSL's long) attribute names -> the short names of RFC 4514 / GnuTLS
SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
}

#: a subject as ``getpeercert()["subject"]`` gives it: RDNs in certificate order, each a tuple of
#: (attribute, value) pairs
Subject = Sequence[Sequence[tuple[str, str]]]


def _escape(value: str) -> str:
    """RFC 4514 section 2.4: backslash before ``"+,;<>\\``, a leading ``#`` or space, a trailing space."""
    out = "".join("\\" + c if c in '"+,;<>\\' else "\\00" if c == "\0" else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def subject_dn(subject: Subject) -> str:
    """The RFC 4514 DN string of ``subject``, as QEMU's TLS session sees the peer.

    >>> subject_dn(((("countryName", "GB"),), (("organizationName", "Example"),), (("commonName", "c1"),)))
    'CN=c1,O=Example,C=GB'
    """
    rdns = ("+".join(f"{SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in reversed(subject))
    return ",".join(rdns)


@dataclass(frozen=True)
class AuthzSimple:
    """``--object authz-simple,id=ID,identity=DN``: allow exactly one identity."""

    id: str
    identity: str

    def is_allowed(self, identity: str) -> bool:
        """True if ``identity`` (a DN from :func:`subject_dn`) is this object's identity, exactly."""
        return identity == self.identity
