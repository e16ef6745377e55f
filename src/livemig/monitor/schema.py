"""QAPI-style argument types for monitor commands, checked with QEMU's error wording.

A command's arguments are a :class:`Struct` of :class:`Member`; a member's type is a scalar
(:data:`STR`, :data:`INT`, :data:`BOOL`, :data:`NUMBER`, :data:`ANY`, a ranged :class:`Int`), an
:class:`Enum`, a :class:`ListOf` or a nested :class:`Struct`. :func:`check` raises
:class:`QMPError` (class ``GenericError``) before the command runs, with the messages of QEMU's
``qobject-input-visitor.c``:

- ``Parameter 'uri' is missing``
- ``Parameter 'bogus' is unexpected``
- ``Invalid parameter type for 'capabilities[0].state', expected: boolean``
- ``Parameter 'capability' does not accept value 'nope'``
- ``Parameter 'multifd-channels' expects uint8_t``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class QMPError(Exception):
    """A command's failure as QMP reports it: ``{"error": {"class": cls, "desc": desc}}``.

    ``cls`` is one of QEMU's QapiErrorClass names: GenericError, CommandNotFound, DeviceNotActive,
    DeviceNotFound, KVMMissingCap.
    """

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.cls, "desc": self.desc}


class Type:
    """Base of the argument types; ``name`` is the word QEMU's type errors use after 'expected:'."""

    name = "any"

    def check(self, value: Any, path: str, member: str | None) -> Any:
        return value


@dataclass(frozen=True)
class Scalar(Type):
    name: str = "any"
    pytypes: tuple[type, ...] = (object,)

    def check(self, value: Any, path: str, member: str | None) -> Any:
        if isinstance(value, bool) and bool not in self.pytypes:
            raise _wrong_type(path, self.name)
        if not isinstance(value, self.pytypes):
            raise _wrong_type(path, self.name)
        return value


@dataclass(frozen=True)
class Int(Type):
    """A JSON integer within [lo, hi]; ``ctype`` names it in the range error (uint8_t, uint64_t...)."""

    lo: int = -(1 << 63)
    hi: int = (1 << 63) - 1
    ctype: str = "int64_t"
    name: str = "integer"

    def check(self, value: Any, path: str, member: str | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(path, self.name)
        if not self.lo <= value <= self.hi:
            raise QMPError(f"Parameter '{path}' expects {self.ctype}")
        return value


@dataclass(frozen=True)
class Enum(Type):
    """A string out of ``values`` (a QAPI enum)."""

    values: tuple[str, ...] = ()
    name: str = "string"

    def check(self, value: Any, path: str, member: str | None) -> Any:
        if not isinstance(value, str):
            raise _wrong_type(path, self.name)
        if value not in self.values:
            # QEMU's input_type_enum names the bare member, "null" for a list element
            raise QMPError(f"Parameter '{member or 'null'}' does not accept value '{value}'")
        return value


@dataclass(frozen=True)
class ListOf(Type):
    item: Type = field(default_factory=Type)
    name: str = "array"

    def check(self, value: Any, path: str, member: str | None) -> Any:
        if not isinstance(value, list):
            raise _wrong_type(path, self.name)
        return [self.item.check(v, f"{path}[{i}]", None) for i, v in enumerate(value)]


@dataclass(frozen=True)
class Member:
    name: str
    type: Type
    optional: bool = False


@dataclass(frozen=True)
class Struct(Type):
    members: tuple[Member, ...] = ()
    name: str = "object"

    def check(self, value: Any, path: str, member: str | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _wrong_type(path, self.name)
        prefix = f"{path}." if path else ""
        out: dict[str, Any] = {}
        for m in self.members:
            if m.name in value:
                out[m.name] = m.type.check(value[m.name], prefix + m.name, m.name)
            elif not m.optional:
                raise QMPError(f"Parameter '{prefix}{m.name}' is missing")
        known = {m.name for m in self.members}
        for key in value:
            if key not in known:
                raise QMPError(f"Parameter '{prefix}{key}' is unexpected")
        return out


def _wrong_type(path: str, expected: str) -> QMPError:
    return QMPError(f"Invalid parameter type for '{path or 'null'}', expected: {expected}")


STR = Scalar("string", (str,))
BOOL = Scalar("boolean", (bool,))
NUMBER = Scalar("number", (int, float))
ANY = Scalar("any", (object,))
INT = Int()
UINT8 = Int(0, 255, "uint8_t")
UINT32 = Int(0, (1 << 32) - 1, "uint32_t")
UINT64 = Int(0, (1 << 64) - 1, "uint64_t")
NO_ARGS = Struct()


def struct(*members: Member) -> Struct:
    return Struct(tuple(members))


def check(schema: Struct, arguments: dict[str, Any]) -> dict[str, Any]:
    """Validated copy of ``arguments``; QMPError (GenericError) naming the first bad member."""
    return schema.check(arguments, "", None)
