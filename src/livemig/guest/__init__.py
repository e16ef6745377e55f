"""Guests behind one interface (:class:`~livemig.guest.base.Guest`): portable and KVM."""

from __future__ import annotations

import importlib

from ..errors import GuestError
from .base import PAGE_SIZE, Guest, GuestConfig, RamBlock

__all__ = ["PAGE_SIZE", "Guest", "GuestConfig", "RamBlock", "create_guest", "default_kind", "kvm_unavailable"]

_KINDS = {"portable": "livemig.guest.portable", "kvm": "livemig.guest.kvm"}


def kvm_unavailable() -> str | None:
    """None if a KVM guest can run here, else why not."""
    try:
        mod = importlib.import_module("livemig.guest.kvm")
    except ImportError as exc:
        return f"KVM guest support not importable: {exc}"
    reason: str | None = mod.unavailable()
    return reason


def default_kind() -> str:
    """"kvm" where /dev/kvm works, else "portable"."""
    return "kvm" if kvm_unavailable() is None else "portable"


def create_guest(config: GuestConfig, incoming: bool = False) -> Guest:
    """Create a guest of ``config.kind``.

    Source (``incoming=False``): RAM filled as ``config.fill`` says, workload loaded, not running.
    Destination (``incoming=True``): RAM zeroed and prefaulted, nothing loaded, not running.
    """
    if config.kind not in _KINDS:
        raise GuestError(f"unknown guest kind '{config.kind}' (known: {', '.join(_KINDS)})")
    mod = importlib.import_module(_KINDS[config.kind])
    guest: Guest = mod.create(config, incoming)
    return guest
