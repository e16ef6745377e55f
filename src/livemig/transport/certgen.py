"""x509 certificates made on the fly, with the ``cryptography`` package, laid out as QEMU expects.

For tests and for ``livemig bench --tls``; real deployments make theirs with ``certtool`` or
``openssl`` (README, "Trust"). ``Ca()`` is a fresh self-signed CA; ``ca.issue(...)`` makes a leaf
certificate with any DN, hosts (DNS names or IP addresses in the subjectAltName) and validity
window, e.g. an expired one. ``ca.server_dir(path)`` / ``ca.client_dir(path)`` write a
tls-creds-x509 directory; :func:`make_pair` writes one directory holding both ends' files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ATTRS = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
          "C": NameOID.COUNTRY_NAME, "L": NameOID.LOCALITY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME}
NOW = dt.datetime.now(dt.UTC)


def name(*parts: tuple[str, str]) -> x509.Name:
    """A DN from (short attribute, value) pairs in certificate order: ``name(("O", "Ex"), ("CN", "c"))``."""
    return x509.Name([x509.NameAttribute(_ATTRS[k], v) for k, v in parts])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Ca:
    """A self-signed test CA (EC P-256, valid a day either side of now)."""

    def __init__(self, cn: str = "livemig test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = name(("O", "livemig tests"), ("CN", cn))
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, subject: x509.Name, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), server: bool = True,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``subject``, valid for ``hosts``, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - dt.timedelta(hours=1))
            .not_valid_after(not_after or NOW + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def _write(self, d: Path, role: str, pair: tuple[bytes, bytes], trust: Ca | None) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca-cert.pem").write_bytes((trust or self).pem)
        (d / f"{role}-cert.pem").write_bytes(pair[0])
        (d / f"{role}-key.pem").write_bytes(pair[1])
        return d

    def server_dir(self, d: Path, subject: x509.Name | None = None, trust: Ca | None = None, **kw: object) -> Path:
        """A tls-creds-x509 server directory (ca-cert.pem, server-cert.pem, server-key.pem); its
        ca-cert.pem is this CA, or ``trust`` (a certificate issued by one CA, trusting another)."""
        pair = self.issue(subject or name(("CN", "livemig-server")), **kw)  # type: ignore[arg-type]
        return self._write(d, "server", pair, trust)

    def client_dir(self, d: Path, subject: x509.Name | None = None, trust: Ca | None = None, **kw: object) -> Path:
        """A tls-creds-x509 client directory (ca-cert.pem, client-cert.pem, client-key.pem)."""
        pair = self.issue(subject or name(("O", "Example"), ("CN", "livemig-client")), server=False, hosts=(),
                          **kw)  # type: ignore[arg-type]
        return self._write(d, "client", pair, trust)


def make_pair(d: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Path:
    """One directory holding both ends' files under a fresh CA (ca-cert.pem, server-cert.pem,
    server-key.pem, client-cert.pem, client-key.pem), the server certificate valid for ``hosts``:
    usable as ``dir=`` of a server and of a client tls-creds-x509."""
    ca = Ca()
    ca.server_dir(d, hosts=hosts)
    return ca.client_dir(d)
