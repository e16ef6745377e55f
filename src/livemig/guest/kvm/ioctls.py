"""The KVM ioctl numbers this package uses: one table, one line per ioctl, grouped by fd kind.

Numbers follow ``linux/kvm.h`` (x86-64): ``_IOC(dir, nr, size) = dir << 30 | size << 16 | 0xAE << 8 | nr``
with dir 0 = none, 1 = write (userspace -> kernel), 2 = read, 3 = both. The sizes are those of the
structs in :mod:`livemig.guest.kvm.structs`; ``tests/guest/test_kvm_binding.py`` checks every number
against the values ``linux/kvm.h`` gives on x86-64 (the ioctls and what each is for: docs/kvm.md,
"Ioctls").
"""

from __future__ import annotations

from typing import NamedTuple

KVMIO = 0xAE

_NONE, _WRITE, _READ = 0, 1, 2


class Ioctl(NamedTuple):
    """One ioctl: the name used in error messages and the request number."""

    name: str
    number: int


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(name: str, nr: int) -> Ioctl:
    return Ioctl(name, _ioc(_NONE, nr, 0))


def _iow(name: str, nr: int, size: int) -> Ioctl:
    return Ioctl(name, _ioc(_WRITE, nr, size))


def _ior(name: str, nr: int, size: int) -> Ioctl:
    return Ioctl(name, _ioc(_READ, nr, size))


def _iowr(name: str, nr: int, size: int) -> Ioctl:
    return Ioctl(name, _ioc(_READ | _WRITE, nr, size))


# --- system fd (/dev/kvm) -------------------------------------------------------------------------
KVM_GET_API_VERSION = _io("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _io("KVM_CREATE_VM", 0x01)
KVM_CHECK_EXTENSION = _io("KVM_CHECK_EXTENSION", 0x03)
KVM_GET_VCPU_MMAP_SIZE = _io("KVM_GET_VCPU_MMAP_SIZE", 0x04)

# --- VM fd ----------------------------------------------------------------------------------------
KVM_CREATE_VCPU = _io("KVM_CREATE_VCPU", 0x41)
KVM_GET_DIRTY_LOG = _iow("KVM_GET_DIRTY_LOG", 0x42, 16)  # struct kvm_dirty_log
KVM_SET_USER_MEMORY_REGION = _iow("KVM_SET_USER_MEMORY_REGION", 0x46, 32)  # kvm_userspace_memory_region
KVM_SET_TSS_ADDR = _io("KVM_SET_TSS_ADDR", 0x47)
KVM_CREATE_IRQCHIP = _io("KVM_CREATE_IRQCHIP", 0x60)
KVM_ENABLE_CAP = _iow("KVM_ENABLE_CAP", 0xA3, 104)  # struct kvm_enable_cap
KVM_CLEAR_DIRTY_LOG = _iowr("KVM_CLEAR_DIRTY_LOG", 0xC0, 24)  # struct kvm_clear_dirty_log
KVM_VM_CHECK_EXTENSION = Ioctl("KVM_CHECK_EXTENSION(vm)", KVM_CHECK_EXTENSION.number)

# --- vCPU fd --------------------------------------------------------------------------------------
KVM_RUN = _io("KVM_RUN", 0x80)
KVM_GET_REGS = _ior("KVM_GET_REGS", 0x81, 144)  # struct kvm_regs
KVM_SET_REGS = _iow("KVM_SET_REGS", 0x82, 144)
KVM_GET_SREGS = _ior("KVM_GET_SREGS", 0x83, 312)  # struct kvm_sregs
KVM_SET_SREGS = _iow("KVM_SET_SREGS", 0x84, 312)
KVM_GET_FPU = _ior("KVM_GET_FPU", 0x8C, 416)  # struct kvm_fpu
KVM_SET_FPU = _iow("KVM_SET_FPU", 0x8D, 416)
KVM_GET_LAPIC = _ior("KVM_GET_LAPIC", 0x8E, 1024)  # struct kvm_lapic_state
KVM_SET_LAPIC = _iow("KVM_SET_LAPIC", 0x8F, 1024)
KVM_GET_MP_STATE = _ior("KVM_GET_MP_STATE", 0x98, 4)  # struct kvm_mp_state
KVM_SET_MP_STATE = _iow("KVM_SET_MP_STATE", 0x99, 4)
KVM_GET_VCPU_EVENTS = _ior("KVM_GET_VCPU_EVENTS", 0x9F, 64)  # struct kvm_vcpu_events
KVM_SET_VCPU_EVENTS = _iow("KVM_SET_VCPU_EVENTS", 0xA0, 64)
KVM_GET_XSAVE = _ior("KVM_GET_XSAVE", 0xA4, 4096)  # struct kvm_xsave
KVM_SET_XSAVE = _iow("KVM_SET_XSAVE", 0xA5, 4096)
KVM_GET_XCRS = _ior("KVM_GET_XCRS", 0xA6, 392)  # struct kvm_xcrs
KVM_SET_XCRS = _iow("KVM_SET_XCRS", 0xA7, 392)

# --- capabilities (KVM_CHECK_EXTENSION arguments) -------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192

#: args[0] bits of KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1
KVM_DIRTY_LOG_INITIALLY_SET = 2

#: kvm_userspace_memory_region.flags
KVM_MEM_LOG_DIRTY_PAGES = 1

#: the only API version this package speaks (stable since Linux 2.6.22)
KVM_API_VERSION = 12

# --- exit reasons (kvm_run.exit_reason) -----------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

#: kvm_mp_state.mp_state
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3
