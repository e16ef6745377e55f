"""ctypes mirrors of the ``linux/kvm.h`` structs this package uses (x86-64). Layout only, no logic.

Sizes are asserted at import so a wrong field list fails loudly instead of corrupting kernel calls.
State that is saved and loaded without interpretation (FPU, XSAVE, XCRs, vCPU events, LAPIC) is kept
as opaque byte arrays of the kernel's size.
"""

from __future__ import annotations

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (32 bytes)."""

    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class DirtyLog(ctypes.Structure):
    """struct kvm_dirty_log (16 bytes): the bitmap pointer must reach ceil(npages/64) u64 words."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", ctypes.c_void_p)]


class ClearDirtyLog(ctypes.Structure):
    """struct kvm_clear_dirty_log (24 bytes): first_page a multiple of 64."""

    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", ctypes.c_void_p)]


class EnableCap(ctypes.Structure):
    """struct kvm_enable_cap (104 bytes)."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class Regs(ctypes.Structure):
    """struct kvm_regs (144 bytes)."""

    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    """struct kvm_segment (24 bytes)."""

    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
                ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class Dtable(ctypes.Structure):
    """struct kvm_dtable (16 bytes)."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    """struct kvm_sregs (312 bytes)."""

    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment), ("gs", Segment),
                ("ss", Segment), ("tr", Segment), ("ldt", Segment), ("gdt", Dtable), ("idt", Dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64), ("efer", u64),
                ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class MpState(ctypes.Structure):
    """struct kvm_mp_state (4 bytes)."""

    _fields_ = [("mp_state", u32)]


class Fpu(ctypes.Structure):
    """struct kvm_fpu (416 bytes), opaque."""

    _fields_ = [("raw", u8 * 416)]


class Xsave(ctypes.Structure):
    """struct kvm_xsave (4096 bytes, the legacy fixed-size region), opaque."""

    _fields_ = [("raw", u8 * 4096)]


class Xcrs(ctypes.Structure):
    """struct kvm_xcrs (392 bytes), opaque."""

    _fields_ = [("raw", u8 * 392)]


class VcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (64 bytes), opaque."""

    _fields_ = [("raw", u8 * 64)]


class LapicState(ctypes.Structure):
    """struct kvm_lapic_state (1024 bytes), opaque."""

    _fields_ = [("raw", u8 * 1024)]


# --- struct kvm_run (the vCPU's shared page; only the part this package reads) ---------------------
class RunIo(ctypes.Structure):
    """kvm_run.io: the data lies at ``run_area[data_offset : data_offset + size * count]``."""

    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class RunMmio(ctypes.Structure):
    """kvm_run.mmio."""

    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunFailEntry(ctypes.Structure):
    """kvm_run.fail_entry."""

    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunInternal(ctypes.Structure):
    """kvm_run.internal."""

    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunSystemEvent(ctypes.Structure):
    """kvm_run.system_event."""

    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class RunExit(ctypes.Union):
    """The exit union of kvm_run (256 bytes)."""

    _fields_ = [("io", RunIo), ("mmio", RunMmio), ("fail_entry", RunFailEntry),
                ("internal", RunInternal), ("system_event", RunSystemEvent), ("padding", u8 * 256)]


class Run(ctypes.Structure):
    """struct kvm_run up to and including the exit union (offsets checked against linux/kvm.h)."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", RunExit)]


_SIZES = {UserspaceMemoryRegion: 32, DirtyLog: 16, ClearDirtyLog: 24, EnableCap: 104, Regs: 144,
          Segment: 24, Dtable: 16, Sregs: 312, MpState: 4, Fpu: 416, Xsave: 4096, Xcrs: 392,
          VcpuEvents: 64, LapicState: 1024, RunExit: 256, Run: 288}
for _cls, _size in _SIZES.items():
    assert ctypes.sizeof(_cls) == _size, f"{_cls.__name__}: {ctypes.sizeof(_cls)} != {_size}"
assert Run.exit.offset == 32 and Run.exit_reason.offset == 8 and Run.immediate_exit.offset == 1
