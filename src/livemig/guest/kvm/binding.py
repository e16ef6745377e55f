"""A small KVM binding layered like the fds it wraps: :class:`Kvm` -> :class:`VmFd` -> :class:`VcpuFd`.

Each object owns its file descriptor (and, for a vCPU, the ``kvm_run`` mapping) and releases it in
``close()`` (also on ``with``). Every ioctl goes through :func:`_ioctl`, so every failure raises the
one error type :class:`KvmError`, which keeps the ioctl's name and the errno. ``VcpuFd.run()``
returns a typed exit (:class:`IoOut`, :class:`IoIn`, :class:`Hlt`, :class:`Mmio`, :class:`Shutdown`,
:class:`FailEntry`, :class:`InternalError`, :class:`SystemEvent`, :class:`Interrupted`,
:class:`UnknownExit`) instead of the raw ``kvm_run`` struct.

The ioctls are issued through libc's ``ioctl`` with ctypes, which releases the GIL: a vCPU thread
inside ``KVM_RUN`` does not stop the other Python threads. A signal delivered to that thread makes
``KVM_RUN`` return EINTR, reported as :data:`INTERRUPTED`.

Dirty logs are returned as raw bitmap words (numpy uint64, bit ``i`` = page ``i`` of the slot);
turning them into page indices is the job of the layer above (:mod:`livemig.guest.kvm.guest`).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import mmap
import os
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ...errors import GuestError
from . import ioctls as io
from . import structs as st
from .ioctls import Ioctl

__all__ = [
    "INTERRUPTED", "Exit", "FailEntry", "Hlt", "InternalError", "Interrupted", "IoIn", "IoOut", "Kvm",
    "KvmError", "Mmio", "Shutdown", "SystemEvent", "UnknownExit", "VcpuFd", "VmFd",
]


class KvmError(GuestError):
    """A KVM ioctl (or the mmap of a KVM fd) failed; ``ioctl`` names it, ``errno`` says why."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        code = errno_mod.errorcode.get(errno, str(errno))
        text = f"{ioctl} failed: {os.strerror(errno)} ({code})"
        if detail:
            text += f" [{detail}]"
        super().__init__(text)
        self.ioctl = ioctl
        self.errno = errno


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, req: Ioctl, arg: int | None = None, detail: str = "") -> int:
    """Issue one ioctl; return its non-negative result or raise :class:`KvmError` naming it."""
    ret: int = _libc_ioctl(fd, req.number, arg)
    if ret < 0:
        raise KvmError(req.name, ctypes.get_errno(), detail)
    return ret


_S = TypeVar("_S", bound=ctypes.Structure)


def _get(fd: int, req: Ioctl, cls: type[_S]) -> _S:
    value = cls()
    _ioctl(fd, req, ctypes.addressof(value))
    return value


def _set(fd: int, req: Ioctl, value: ctypes.Structure) -> None:
    _ioctl(fd, req, ctypes.addressof(value))


# --- typed exits ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote ``data`` (``size`` bytes x ``count``) to I/O ``port``."""

    port: int
    size: int
    data: bytes

    @property
    def value(self) -> int:
        """The first (usually only) item written, as an unsigned integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest reads ``size`` bytes x ``count`` from ``port``; answer with ``VcpuFd.set_io_in_data``."""

    port: int
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class Hlt:
    """The guest executed HLT (no in-kernel irqchip)."""


@dataclass(frozen=True, slots=True)
class Mmio:
    """The guest accessed ``addr``, which no memory slot covers."""

    addr: int
    is_write: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The guest shut down (on x86: a triple fault)."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The hardware refused to enter the guest."""

    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not handle something (for example an emulation failure)."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """A system event (reset, shutdown, crash) requested by the guest."""

    type: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal arrived or ``immediate_exit`` was set."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """An exit reason this binding does not decode."""

    reason: int


Exit = IoOut | IoIn | Hlt | Mmio | Shutdown | FailEntry | InternalError | SystemEvent | Interrupted | UnknownExit

HLT = Hlt()
SHUTDOWN = Shutdown()
INTERRUPTED = Interrupted()


# --- /dev/kvm -------------------------------------------------------------------------------------
class Kvm:
    """The system fd (``/dev/kvm``): capabilities and VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise GuestError(f"no {path}: the kvm module is not loaded or the device is not "
                             "available in this container") from exc
        except PermissionError as exc:
            raise GuestError(f"permission denied opening {path}: run as root or join the group "
                             "owning it (usually 'kvm')") from exc
        except OSError as exc:
            raise GuestError(f"cannot open {path}: {exc}") from exc
        self.fd = fd
        self.path = path

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        """Wrap an already open fd (ownership passes to the object)."""
        obj = cls.__new__(cls)
        obj.fd = fd
        obj.path = f"fd {fd}"
        return obj

    def api_version(self) -> int:
        return _ioctl(self.fd, io.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """0 if capability ``cap`` is missing, else its (positive) value."""
        return _ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap, f"cap {cap}")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self) -> VmFd:
        mmap_size = self.vcpu_mmap_size()
        return VmFd(_ioctl(self.fd, io.KVM_CREATE_VM, 0), mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- VM -------------------------------------------------------------------------------------------
class VmFd:
    """A VM fd: memory slots, dirty log, vCPUs. ``close()`` closes the vCPUs it created first."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.vcpus: list[VcpuFd] = []

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, io.KVM_VM_CHECK_EXTENSION, cap, f"cap {cap}")

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = st.EnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        _ioctl(self.fd, io.KVM_ENABLE_CAP, ctypes.addressof(ec), f"cap {cap} args {list(args)}")

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int) -> None:
        """Create, change (flags only) or delete (``memory_size`` 0) memory slot ``slot``."""
        region = st.UserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                          memory_size=memory_size, userspace_addr=userspace_addr)
        _ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region),
               f"slot {slot} flags {flags:#x} gpa {guest_phys_addr:#x} size {memory_size:#x}")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, io.KVM_SET_TSS_ADDR, addr)

    def create_irqchip(self) -> None:
        _ioctl(self.fd, io.KVM_CREATE_IRQCHIP)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = _ioctl(self.fd, io.KVM_CREATE_VCPU, vcpu_id, f"vcpu {vcpu_id}")
        vcpu = VcpuFd(fd, self.vcpu_mmap_size, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def get_dirty_log(self, slot: int, bitmap: np.ndarray) -> None:
        """Fill ``bitmap`` (uint64, >= ceil(npages/64) words, C-contiguous) with slot ``slot``'s log.

        Without manual protect this also clears the log and write-protects the pages again.
        """
        _check_bitmap(bitmap)
        dl = st.DirtyLog(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        _ioctl(self.fd, io.KVM_GET_DIRTY_LOG, ctypes.addressof(dl), f"slot {slot}")

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: np.ndarray) -> None:
        """Clear (and write-protect again) the pages whose bits are set in ``bitmap`` (manual protect).

        ``first_page`` must be a multiple of 64; ``bitmap`` bit 0 is ``first_page``.
        """
        _check_bitmap(bitmap)
        cl = st.ClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page,
                              dirty_bitmap=bitmap.ctypes.data)
        _ioctl(self.fd, io.KVM_CLEAR_DIRTY_LOG, ctypes.addressof(cl),
               f"slot {slot} first_page {first_page} num_pages {num_pages}")

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VmFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _check_bitmap(bitmap: np.ndarray) -> None:
    if bitmap.dtype != np.uint64 or not bitmap.flags.c_contiguous or not bitmap.flags.writeable:
        raise GuestError("dirty bitmap must be a writable C-contiguous numpy uint64 array")


# --- vCPU -----------------------------------------------------------------------------------------
class VcpuFd:
    """A vCPU fd and its ``kvm_run`` mapping. Only one thread may call :meth:`run` at a time."""

    def __init__(self, fd: int, mmap_size: int, vcpu_id: int = 0) -> None:
        self.fd = fd
        self.id = vcpu_id
        try:
            self._mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            _close_quietly(fd)
            self.fd = -1
            raise KvmError("mmap(kvm_run)", exc.errno or errno_mod.EINVAL, f"vcpu {vcpu_id}") from exc
        except ValueError as exc:  # e.g. a mapping larger than the file behind a non-KVM fd
            _close_quietly(fd)
            self.fd = -1
            raise KvmError("mmap(kvm_run)", errno_mod.EINVAL, f"vcpu {vcpu_id}: {exc}") from exc
        self._run: st.Run | None = st.Run.from_buffer(self._mm)

    @property
    def run_struct(self) -> st.Run:
        if self._run is None:
            raise GuestError(f"vcpu {self.id} is closed")
        return self._run

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def run(self) -> Exit:
        """Enter the guest until it exits; return the exit. EINTR gives :data:`INTERRUPTED`."""
        if self._run is None:
            raise GuestError(f"vcpu {self.id} is closed")
        ret = _libc_ioctl(self.fd, io.KVM_RUN.number, None)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno_mod.EINTR:
                return INTERRUPTED
            raise KvmError(io.KVM_RUN.name, err, f"vcpu {self.id}")
        r = self._run
        reason = r.exit_reason
        if reason == io.KVM_EXIT_IO:
            pio = r.exit.io
            if pio.direction == io.KVM_EXIT_IO_OUT:
                off = pio.data_offset
                return IoOut(pio.port, pio.size, self._mm[off: off + pio.size * pio.count])
            return IoIn(pio.port, pio.size, pio.count)
        if reason == io.KVM_EXIT_HLT:
            return HLT
        if reason == io.KVM_EXIT_INTR:
            return INTERRUPTED
        if reason == io.KVM_EXIT_MMIO:
            m = r.exit.mmio
            return Mmio(m.phys_addr, bool(m.is_write), bytes(m.data)[: m.len])
        if reason == io.KVM_EXIT_SHUTDOWN:
            return SHUTDOWN
        if reason == io.KVM_EXIT_FAIL_ENTRY:
            fe = r.exit.fail_entry
            return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        if reason == io.KVM_EXIT_INTERNAL_ERROR:
            ie = r.exit.internal
            return InternalError(ie.suberror, tuple(ie.data[: min(ie.ndata, 16)]))
        if reason == io.KVM_EXIT_SYSTEM_EVENT:
            return SystemEvent(r.exit.system_event.type)
        return UnknownExit(reason)

    def set_io_in_data(self, data: bytes) -> None:
        """Answer the pending :class:`IoIn` exit (``size * count`` bytes) before the next run()."""
        pio = self.run_struct.exit.io
        want = pio.size * pio.count
        if len(data) != want:
            raise GuestError(f"I/O IN answer for port {pio.port:#x}: {len(data)} bytes, expected {want}")
        off = pio.data_offset
        self._mm[off: off + want] = data

    # state: get_* returns a fresh struct, set_* takes one
    def get_regs(self) -> st.Regs:
        return _get(self.fd, io.KVM_GET_REGS, st.Regs)

    def set_regs(self, v: st.Regs) -> None:
        _set(self.fd, io.KVM_SET_REGS, v)

    def get_sregs(self) -> st.Sregs:
        return _get(self.fd, io.KVM_GET_SREGS, st.Sregs)

    def set_sregs(self, v: st.Sregs) -> None:
        _set(self.fd, io.KVM_SET_SREGS, v)

    def get_fpu(self) -> st.Fpu:
        return _get(self.fd, io.KVM_GET_FPU, st.Fpu)

    def set_fpu(self, v: st.Fpu) -> None:
        _set(self.fd, io.KVM_SET_FPU, v)

    def get_xsave(self) -> st.Xsave:
        return _get(self.fd, io.KVM_GET_XSAVE, st.Xsave)

    def set_xsave(self, v: st.Xsave) -> None:
        _set(self.fd, io.KVM_SET_XSAVE, v)

    def get_xcrs(self) -> st.Xcrs:
        return _get(self.fd, io.KVM_GET_XCRS, st.Xcrs)

    def set_xcrs(self, v: st.Xcrs) -> None:
        _set(self.fd, io.KVM_SET_XCRS, v)

    def get_mp_state(self) -> st.MpState:
        return _get(self.fd, io.KVM_GET_MP_STATE, st.MpState)

    def set_mp_state(self, v: st.MpState) -> None:
        _set(self.fd, io.KVM_SET_MP_STATE, v)

    def get_vcpu_events(self) -> st.VcpuEvents:
        return _get(self.fd, io.KVM_GET_VCPU_EVENTS, st.VcpuEvents)

    def set_vcpu_events(self, v: st.VcpuEvents) -> None:
        _set(self.fd, io.KVM_SET_VCPU_EVENTS, v)

    def get_lapic(self) -> st.LapicState:
        return _get(self.fd, io.KVM_GET_LAPIC, st.LapicState)

    def set_lapic(self, v: st.LapicState) -> None:
        _set(self.fd, io.KVM_SET_LAPIC, v)

    def close(self) -> None:
        if self._run is not None:
            self._run = None  # drop the export before unmapping
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a view of kvm_run; the mapping goes when it does
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VcpuFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
