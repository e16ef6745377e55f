"""The VM's QOM objects for TLS (``object-add``/``object-del``: ``tls-creds-x509``, ``authz-simple``)
and its ``tls-creds``/``tls-hostname``/``tls-authz`` migration parameters.

Objects are kept as the ``--object`` text :func:`livemig.transport.tls.parse_object` reads, so a
migration resolves them exactly as ``livemig migrate --object ... --tls-creds ...`` does
(:func:`livemig.transport.tls.resolve`). Errors are QMPError with that wording.
"""

from __future__ import annotations

from typing import Any

from ..errors import MigrationError
from ..monitor.schema import QMPError
from ..transport.tls import Tls, parse_object, resolve

#: the migration parameters this module owns, QEMU's names, "" = unset (as QEMU reports them)
TLS_PARAMETERS = ("tls-creds", "tls-hostname", "tls-authz")
#: object-add's qom-types livemig has
OBJECT_TYPES = ("tls-creds-x509", "authz-simple")


def _text(value: Any) -> str:
    text = "on" if value is True else "off" if value is False else str(value)
    return text.replace(",", ",,")


class TlsObjects:
    """Objects by id (their ``--object`` text) and the three TLS parameters."""

    def __init__(self) -> None:
        self.objects: dict[str, str] = {}
        self.params: dict[str, str] = dict.fromkeys(TLS_PARAMETERS, "")

    def add(self, args: dict[str, Any]) -> None:
        """object-add: ``qom-type``, ``id`` and the type's properties (QEMU's flat form, or under
        ``props``). QMPError for an unknown type or property, a duplicate id, a missing property."""
        args = dict(args)
        kind, oid = str(args.pop("qom-type")), str(args.pop("id"))
        props = dict(args.pop("props", None) or {}) | args
        if kind not in OBJECT_TYPES:
            raise QMPError(f"invalid object type: {kind} (livemig knows {', '.join(OBJECT_TYPES)})")
        if oid in self.objects:
            raise QMPError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
        text = ",".join([kind, f"id={_text(oid)}", *(f"{k}={_text(v)}" for k, v in props.items())])
        try:
            parse_object(text)
        except MigrationError as exc:
            raise QMPError(str(exc).replace("--object", "object-add")) from exc
        self.objects[oid] = text

    def delete(self, oid: str) -> None:
        """object-del; QMPError for an unknown id or one a TLS parameter names (QEMU: object in use)."""
        if oid not in self.objects:
            raise QMPError(f"object '{oid}' not found")
        if oid in (self.params["tls-creds"], self.params["tls-authz"]):
            raise QMPError(f"object '{oid}' is in use, can not be deleted")
        del self.objects[oid]

    def set(self, values: dict[str, Any]) -> dict[str, Any]:
        """Take the TLS parameters out of a migrate-set-parameters ``values``; returns the rest."""
        rest = dict(values)
        for name in TLS_PARAMETERS:
            if name in rest:
                value = rest.pop(name)
                self.params[name] = "" if value is None else str(value)
        return rest

    def resolve(self, server: bool) -> Tls | None:
        """The Tls of this side's next migration (None when tls-creds is empty), its files loaded.
        QMPError naming what does not fit (unknown id, endpoint, authz on a client, bad file)."""
        creds = self.params["tls-creds"] or None
        if creds is None:
            return None
        try:
            tls = resolve(self.objects.values(), creds, self.params["tls-hostname"] or None,
                          self.params["tls-authz"] or None, endpoint="server" if server else "client")
            if tls is not None:
                tls.context()
        except MigrationError as exc:
            raise QMPError(str(exc).replace("--tls-", "tls-")) from exc
        return tls
