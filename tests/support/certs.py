"""Certificates made in the test: :mod:`livemig.transport.certgen` (also what ``livemig bench --tls`` uses)."""

from livemig.transport.certgen import NOW, Ca, name

__all__ = ["NOW", "Ca", "name"]
