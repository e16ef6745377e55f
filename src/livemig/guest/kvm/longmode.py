"""x86-64 long mode without firmware: the guest's physical layout, its page tables, and the
segment and control registers every vCPU starts with (docs/kvm.md, "Long mode without firmware").

Guest physical layout (page indices)::

    0            unused
    1            PML4          (U/S, R/W, A set)
    2            PDPT
    3 .. 3+npd   page directories, 512 x 2 MiB pages each (npd = ceil(memory / 1 GiB))
    pt           4 KiB page table of the first 2 MiB (the code page read-only, see write_page_tables)
    code         the workload program (one page)
    params+v     vCPU v's parameter page (RBP points at it; offsets in :mod:`.protocol`)
    first_free.. RAM filled as ``config.fill`` says; the working set is carved from here

No GDT is needed: ``KVM_SET_SREGS`` loads the hidden parts of the segment registers directly, and
the guest never reloads a selector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import GuestError
from ..base import PAGE_SIZE, GuestConfig
from . import binding as b
from . import structs as st

#: the TSS address given to KVM_SET_TSS_ADDR (VMX needs one; the guest never uses a TSS)
TSS_ADDR = 0xFFFBD000


@dataclass(frozen=True)
class Layout:
    """Where things live in guest RAM (page indices); a pure function of the config."""

    npages: int
    npd: int
    pt: int
    code: int
    params: int
    first_free: int
    working_set: int

    PML4 = 1
    PDPT = 2
    PD0 = 3

    @classmethod
    def of(cls, config: GuestConfig) -> Layout:
        """The layout for ``config``; GuestError if memory or working set do not fit it."""
        memory = config.memory
        if memory % PAGE_SIZE or memory < (2 << 20):
            raise GuestError(f"guest memory {memory}: expected a multiple of {PAGE_SIZE} of at least 2 MiB")
        npd = -(-memory // (1 << 30))
        if npd > 256:
            raise GuestError(f"guest memory {memory}: at most 256 GiB")
        npages = memory // PAGE_SIZE
        pt = cls.PD0 + npd
        code = pt + 1
        params = code + 1
        first_free = params + config.smp  # < 512: inside the 4 KiB-mapped first 2 MiB
        free = npages - first_free
        ws = config.working_set or free
        if config.working_set < 0 or ws > free or ws < config.smp:
            raise GuestError(f"working_set {config.working_set}: expected 0 (all free RAM) or "
                             f"{config.smp}..{free} pages for {memory} bytes and smp {config.smp}")
        return cls(npages, npd, pt, code, params, first_free, ws)

    def vcpu_pages(self, smp: int, vcpu: int) -> tuple[int, int]:
        """(first page, page count) of vCPU ``vcpu``'s share of the working set."""
        share = self.working_set // smp
        first = self.first_free + vcpu * share
        count = share if vcpu < smp - 1 else self.working_set - share * (smp - 1)
        return first, count


def write_page_tables(ram64: np.ndarray, memory: int, pt: int | None = None,
                      read_only: tuple[int, ...] = ()) -> None:
    """Identity-map ``memory`` bytes for user mode: PML4 at page 1, PDPT at 2, page directories from 3.

    ``ram64`` is guest RAM as a (npages, 512) uint64 view. Memory is mapped with 2 MiB pages, except
    the first 2 MiB when ``pt`` (a page index) is given: then page ``pt`` holds a 4 KiB page table
    for it, with ``read_only`` pages mapped without write access. Accessed and dirty bits are
    preset so the guest's MMU never writes the tables (they stay out of the dirty log). The code
    page must be read-only: KVM maps a page whose guest PTE is writable and dirty as writable even
    on a fetch, and so logs it as dirty (docs/kvm.md, "Dirty log").
    """
    npd = -(-memory // (1 << 30))
    ram64[Layout.PML4, 0] = Layout.PDPT * PAGE_SIZE | 0x27  # P, R/W, U/S, A
    for i in range(npd):
        ram64[Layout.PDPT, i] = (Layout.PD0 + i) * PAGE_SIZE | 0x27
    n2m = -(-memory // (2 << 20))
    pde = (np.arange(n2m, dtype=np.uint64) << np.uint64(21)) | np.uint64(0xE7)  # P RW US A D PS
    ram64[Layout.PD0: Layout.PD0 + npd].reshape(-1)[:n2m] = pde
    if pt is not None:
        n4k = min(512, memory // PAGE_SIZE)
        pte = (np.arange(n4k, dtype=np.uint64) << np.uint64(12)) | np.uint64(0x67)  # P RW US A D
        for page in read_only:
            pte[page] = (page * PAGE_SIZE) | 0x25  # P US A
        ram64[pt, :n4k] = pte
        ram64[Layout.PD0, 0] = pt * PAGE_SIZE | 0x27


def _segment(seg: st.Segment, selector: int, code: bool, dpl: int) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 11 if code else 3  # execute/read accessed, read/write accessed
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def set_long_mode(vcpu: b.VcpuFd, cpl: int, rip: int, rbp: int) -> None:
    """Put ``vcpu`` in 64-bit long mode at ``cpl`` (0 or 3, flat segments, paging with the tables of
    :func:`write_page_tables`), RIP/RBP as given, RFLAGS IOPL=3 at CPL3 so OUT still exits."""
    sregs = vcpu.get_sregs()
    _segment(sregs.cs, 0x2B if cpl else 0x08, True, cpl)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), 0x23 if cpl else 0x10, False, cpl)
    sregs.cr3 = Layout.PML4 * PAGE_SIZE
    sregs.cr4 = 0x20  # PAE
    sregs.cr0 = 0x80050033  # PG AM WP NE ET MP PE
    sregs.efer = 0x500  # LMA LME
    vcpu.set_sregs(sregs)
    regs = st.Regs()
    regs.rip = rip
    regs.rbp = rbp
    regs.rflags = 0x3002 if cpl else 0x2
    vcpu.set_regs(regs)

