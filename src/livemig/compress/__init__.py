"""Compression methods behind one registry.

The registry lists every method livemig knows, in QEMU's order; :func:`get_method` returns the class
or raises :class:`~livemig.errors.MethodUnavailable` saying why it cannot run here and what to
install. Methods live one per module and are imported lazily, so a missing optional library only
affects its own method.
"""

from __future__ import annotations

import importlib

from .._types import Buffer
from ..errors import MethodUnavailable, ParameterError
from ..wire.constants import PAGE_SIZE
from .base import MAX_PAYLOAD, Compressor, Decompressor, Method

__all__ = [
    "MAX_PAYLOAD",
    "Buffer",
    "Compressor",
    "Decompressor",
    "Method",
    "available_methods",
    "create_method",
    "get_method",
    "method_names",
]

#: QEMU's MultiFDCompression values, mapped to the module that implements each.
_MODULES: dict[str, str] = {
    "none": "livemig.compress.nocomp",
    "zlib": "livemig.compress.zlib_method",
    "zstd": "livemig.compress.zstd_method",
    "qatzip": "livemig.compress.qatzip",
    "qpl": "livemig.compress.qpl",
    "uadk": "livemig.compress.uadk",
}

_cache: dict[str, type[Method]] = {}


def method_names() -> list[str]:
    """Every method name livemig knows (whether or not it can run here)."""
    return list(_MODULES)


def get_method(name: str) -> type[Method]:
    """The Method class for ``name``; ParameterError if unknown, MethodUnavailable if it cannot run."""
    if name not in _MODULES:
        raise ParameterError(f"Parameter 'multifd-compression' does not accept value '{name}'")
    if name not in _cache:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise MethodUnavailable(f"compression method '{name}' is not available: {exc}") from exc
        _cache[name] = module.METHOD
    cls = _cache[name]
    reason = cls.unavailable()
    if reason:
        raise MethodUnavailable(f"compression method '{name}' cannot run here: {reason}")
    return cls


def create_method(name: str, level: int = 1, page_size: int = PAGE_SIZE) -> Method:
    """An instance of method ``name`` at ``level`` (ignored for methods without levels)."""
    return get_method(name)(level=level, page_size=page_size)


def available_methods() -> dict[str, str | None]:
    """name -> None if it runs here, else the reason it does not."""
    out: dict[str, str | None] = {}
    for name in _MODULES:
        try:
            get_method(name)
            out[name] = None
        except MethodUnavailable as exc:
            out[name] = str(exc)
    return out
