"""The KVM guest's dirty log: one memory slot's KVM log plus the pages the host wrote itself.

``KVM_MEM_LOG_DIRTY_PAGES`` is set on the slot between :meth:`SlotDirtyLog.start` and
:meth:`SlotDirtyLog.stop`. With ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (enabled without
INITIALLY_SET, so the first sync reports only pages written since the start) each sync is
KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG of what it returned; without it, GET alone also
re-protects (docs/kvm.md, "Dirty log"). Pages the host writes into guest RAM itself (budget
grants, rate changes, ``mark_dirty``) are invisible to KVM: they go into a host bitmap of the same
layout that is OR-ed into the next sync.
"""

from __future__ import annotations

import threading

import numpy as np

from ...ram.pages import bitmap_to_pages
from ..base import RamBlock
from ..bitmap import new_bitmap, set_page_bits
from . import binding as b
from . import ioctls as io


class SlotDirtyLog:
    """The dirty log of memory slot ``slot``, which maps all of ``block`` at guest physical 0."""

    def __init__(self, slot: int, block: RamBlock, manual_protect: bool) -> None:
        self.slot = slot
        self.block = block
        self.manual_protect = manual_protect
        self.logging = False
        self._bitmap = new_bitmap(block.npages)
        self._host = new_bitmap(block.npages)
        self._host_lock = threading.Lock()

    def register(self, vm: b.VmFd, log: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION for the slot, with dirty logging on or off."""
        flags = io.KVM_MEM_LOG_DIRTY_PAGES if log else 0
        vm.set_user_memory_region(self.slot, flags, 0, self.block.size, self.block.pages.ctypes.data)

    def start(self, vm: b.VmFd) -> None:
        """Log from now on; a log already running drops what it holds (KVM's and the host's)."""
        if self.logging:
            vm.get_dirty_log(self.slot, self._bitmap)  # discard what was logged so far
            if self.manual_protect:
                vm.clear_dirty_log(self.slot, 0, self.block.npages, self._bitmap)
        else:
            self.register(vm, log=True)
            self.logging = True
        with self._host_lock:
            self._host[:] = 0

    def sync(self, vm: b.VmFd) -> np.ndarray:
        """Sorted int64 indices of the pages written by the guest or the host since the last sync.

        Cost: one KVM_GET_DIRTY_LOG (+ KVM_CLEAR_DIRTY_LOG when something was dirty) and numpy work
        proportional to the bitmap size and the dirty words; no Python loop over pages.
        """
        bm = self._bitmap
        vm.get_dirty_log(self.slot, bm)
        if self.manual_protect and bm.any():
            vm.clear_dirty_log(self.slot, 0, self.block.npages, bm)
        with self._host_lock:
            bm |= self._host
            self._host[:] = 0
        return bitmap_to_pages(bm, self.block.npages)

    def stop(self, vm: b.VmFd) -> None:
        """Stop logging (no-op when not logging)."""
        if self.logging:
            self.register(vm, log=False)
            self.logging = False

    def mark(self, pages: np.ndarray) -> None:
        """Record host writes to ``pages`` (int64 indices, checked by the caller) for the next sync."""
        with self._host_lock:
            set_page_bits(self._host, pages)
