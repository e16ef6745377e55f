"""A real KVM guest driven from Python through ``/dev/kvm`` ioctls (see :mod:`.guest`; the KVM facts
it relies on: docs/kvm.md).

Layers: :mod:`.ioctls` (numbers), :mod:`.structs` (ctypes layouts), :mod:`.binding`
(``Kvm`` -> ``VmFd`` -> ``VcpuFd``, ``KvmError``, typed exits); on top of them :mod:`.longmode`
(layout, page tables, registers), :mod:`.runner` (vCPU threads, exits, pause), :mod:`.dirtylog`,
:mod:`.state` (the vCPU state blob), :mod:`.protocol` (talking to the guest programs) and
:mod:`.guest` (``KvmGuest``, which ties them together); ``programs/`` holds the nasm sources of the
guest workloads and their committed assembled bytes.
"""

from __future__ import annotations

from ...errors import GuestError
from ..base import GuestConfig
from .binding import KvmError
from .guest import KvmGuest, open_kvm
from .runner import install_kick_handler

__all__ = ["KvmError", "KvmGuest", "create", "unavailable"]

_unavailable_cache: dict[str, str | None] = {}


def unavailable(path: str = "/dev/kvm") -> str | None:
    """None if ``path`` opens, speaks KVM API 12 and has every required capability; else the reason.

    The answer is cached per path (it does not change while the process runs).
    """
    if path not in _unavailable_cache:
        try:
            open_kvm(path).close()
            _unavailable_cache[path] = None
        except GuestError as exc:
            _unavailable_cache[path] = str(exc)
    return _unavailable_cache[path]


def create(config: GuestConfig, incoming: bool) -> KvmGuest:
    """A KVM guest for ``config`` (source: RAM filled and program loaded; destination: zeroed,
    prefaulted RAM, nothing runs until ``load_state`` + ``resume``). Installs the SIGUSR1 handler
    used to pause vCPUs, so call it from the main thread the first time."""
    install_kick_handler()
    return KvmGuest(config, incoming)
