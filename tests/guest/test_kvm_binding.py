"""The KVM binding: ioctl numbers, every wrapper's error path on a bad fd, typed exits, the dirty log."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from livemig.errors import GuestError
from livemig.guest.base import RamBlock
from livemig.guest.kvm import binding as b
from livemig.guest.kvm import ioctls as io
from livemig.guest.kvm import structs as st
from livemig.guest.kvm.longmode import set_long_mode, write_page_tables

# numbers printed by a C program including linux/kvm.h on x86-64 (docs/kvm.md, "Ioctls", lists them)
KERNEL_NUMBERS = {
    "KVM_GET_API_VERSION": 0xAE00, "KVM_CREATE_VM": 0xAE01, "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04, "KVM_CREATE_VCPU": 0xAE41, "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46, "KVM_SET_TSS_ADDR": 0xAE47, "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_ENABLE_CAP": 0x4068AEA3, "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0, "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81, "KVM_SET_REGS": 0x4090AE82, "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84, "KVM_GET_FPU": 0x81A0AE8C, "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E, "KVM_SET_LAPIC": 0x4400AE8F, "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99, "KVM_GET_VCPU_EVENTS": 0x8040AE9F, "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_XSAVE": 0x9000AEA4, "KVM_SET_XSAVE": 0x5000AEA5, "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
}


def test_ioctl_numbers_match_linux_headers() -> None:
    table = {v.name: v.number for v in vars(io).values() if isinstance(v, io.Ioctl)}
    for name, number in KERNEL_NUMBERS.items():
        assert table[name] == number, name


def test_kvm_error_carries_name_and_errno() -> None:
    err = b.KvmError("KVM_RUN", errno.EBADF, "vcpu 0")
    assert isinstance(err, GuestError)
    assert err.ioctl == "KVM_RUN" and err.errno == errno.EBADF
    assert "KVM_RUN" in str(err) and "EBADF" in str(err)


def test_missing_device_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(GuestError, match="no .*nope"):
        b.Kvm(str(tmp_path / "nope"))


def test_no_permission_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: str, flags: int) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(b.os, "open", denied)  # root bypasses file modes, so simulate a plain user
    with pytest.raises(GuestError, match="permission denied opening /dev/kvm"):
        b.Kvm()


# --- error paths on bad fds ------------------------------------------------------------------------
def _closed_fd() -> int:
    """An fd number that is not open (beyond any descriptor this process has)."""
    fd = 1_000_000
    with pytest.raises(OSError):
        os.fstat(fd)
    return fd


@pytest.fixture
def not_kvm_fd() -> Iterator[int]:
    """A memfd big enough to be mapped as a kvm_run area, on which every KVM ioctl is ENOTTY."""
    fd = os.memfd_create("not-kvm")
    os.ftruncate(fd, 3 * 4096)
    yield fd
    os.close(fd)


_BITMAP = np.zeros(4, dtype=np.uint64)
SYSTEM_CALLS: list[tuple[str, Callable[[b.Kvm], object]]] = [
    ("KVM_GET_API_VERSION", lambda k: k.api_version()),
    ("KVM_CHECK_EXTENSION", lambda k: k.check_extension(io.KVM_CAP_USER_MEMORY)),
    ("KVM_GET_VCPU_MMAP_SIZE", lambda k: k.vcpu_mmap_size()),
    ("KVM_GET_VCPU_MMAP_SIZE", lambda k: k.create_vm()),  # create_vm asks for the mmap size first
]
VM_CALLS: list[tuple[str, Callable[[b.VmFd], object]]] = [
    ("KVM_CHECK_EXTENSION(vm)", lambda v: v.check_extension(io.KVM_CAP_USER_MEMORY)),
    ("KVM_ENABLE_CAP", lambda v: v.enable_cap(io.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)),
    ("KVM_SET_USER_MEMORY_REGION", lambda v: v.set_user_memory_region(0, 0, 0, 4096, 0)),
    ("KVM_SET_TSS_ADDR", lambda v: v.set_tss_addr(0xFFFBD000)),
    ("KVM_CREATE_IRQCHIP", lambda v: v.create_irqchip()),
    ("KVM_CREATE_VCPU", lambda v: v.create_vcpu(0)),
    ("KVM_GET_DIRTY_LOG", lambda v: v.get_dirty_log(0, _BITMAP)),
    ("KVM_CLEAR_DIRTY_LOG", lambda v: v.clear_dirty_log(0, 0, 64, _BITMAP)),
]
VCPU_CALLS: list[tuple[str, Callable[[b.VcpuFd], object]]] = [
    ("KVM_RUN", lambda c: c.run()),
    ("KVM_GET_REGS", lambda c: c.get_regs()), ("KVM_SET_REGS", lambda c: c.set_regs(st.Regs())),
    ("KVM_GET_SREGS", lambda c: c.get_sregs()), ("KVM_SET_SREGS", lambda c: c.set_sregs(st.Sregs())),
    ("KVM_GET_FPU", lambda c: c.get_fpu()), ("KVM_SET_FPU", lambda c: c.set_fpu(st.Fpu())),
    ("KVM_GET_XSAVE", lambda c: c.get_xsave()), ("KVM_SET_XSAVE", lambda c: c.set_xsave(st.Xsave())),
    ("KVM_GET_XCRS", lambda c: c.get_xcrs()), ("KVM_SET_XCRS", lambda c: c.set_xcrs(st.Xcrs())),
    ("KVM_GET_MP_STATE", lambda c: c.get_mp_state()),
    ("KVM_SET_MP_STATE", lambda c: c.set_mp_state(st.MpState())),
    ("KVM_GET_VCPU_EVENTS", lambda c: c.get_vcpu_events()),
    ("KVM_SET_VCPU_EVENTS", lambda c: c.set_vcpu_events(st.VcpuEvents())),
    ("KVM_GET_LAPIC", lambda c: c.get_lapic()), ("KVM_SET_LAPIC", lambda c: c.set_lapic(st.LapicState())),
]


@pytest.mark.parametrize(("name", "call"), SYSTEM_CALLS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SYSTEM_CALLS)])
def test_system_wrappers_on_closed_fd(name: str, call: Callable[[b.Kvm], object]) -> None:
    with pytest.raises(b.KvmError) as info:
        call(b.Kvm.from_fd(_closed_fd()))
    assert info.value.ioctl == name and info.value.errno == errno.EBADF
    assert name in str(info.value)


@pytest.mark.parametrize(("name", "call"), SYSTEM_CALLS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SYSTEM_CALLS)])
def test_system_wrappers_on_non_kvm_fd(name: str, call: Callable[[b.Kvm], object], not_kvm_fd: int) -> None:
    with pytest.raises(b.KvmError) as info:
        call(b.Kvm.from_fd(not_kvm_fd))
    assert info.value.ioctl == name and info.value.errno == errno.ENOTTY


@pytest.mark.parametrize(("name", "call"), VM_CALLS, ids=[n for n, _ in VM_CALLS])
def test_vm_wrappers_on_bad_fds(name: str, call: Callable[[b.VmFd], object], not_kvm_fd: int) -> None:
    with pytest.raises(b.KvmError) as info:
        call(b.VmFd(_closed_fd(), 12288))
    assert (info.value.ioctl, info.value.errno) == (name, errno.EBADF)
    with pytest.raises(b.KvmError) as info:
        call(b.VmFd(not_kvm_fd, 12288))
    assert (info.value.ioctl, info.value.errno) == (name, errno.ENOTTY)


@pytest.mark.parametrize(("name", "call"), VCPU_CALLS, ids=[n for n, _ in VCPU_CALLS])
def test_vcpu_wrappers_on_non_kvm_fd(name: str, call: Callable[[b.VcpuFd], object], not_kvm_fd: int) -> None:
    vcpu = b.VcpuFd(os.dup(not_kvm_fd), 12288)  # the VcpuFd owns (and closes) its copy
    try:
        with pytest.raises(b.KvmError) as info:
            call(vcpu)
        assert (info.value.ioctl, info.value.errno) == (name, errno.ENOTTY)
        assert name in str(info.value)
    finally:
        vcpu.close()


def test_vcpu_mmap_of_closed_fd() -> None:
    with pytest.raises(b.KvmError) as info:
        b.VcpuFd(_closed_fd(), 12288)
    assert (info.value.ioctl, info.value.errno) == ("mmap(kvm_run)", errno.EBADF)


def test_bitmap_must_be_uint64() -> None:
    with pytest.raises(GuestError, match="uint64"):
        b.VmFd(_closed_fd(), 12288).get_dirty_log(0, np.zeros(4, dtype=np.uint32))


# --- a real VM ---------------------------------------------------------------------------------------
MEM = 4 << 20  # 2 x 2 MiB pages; a third page-directory entry maps 4-6 MiB, which no slot covers
CODE_PAGE = 4

# CPL0 code (page 4), hand-assembled (nasm syntax in the comments)
PROGRAM = bytes.fromhex(
    "c6042500500000" "01"    # mov byte [0x5000], 1
    "c6042500900000" "01"    # mov byte [0x9000], 1
    "c6042523710000" "01"    # mov byte [0x7123], 1
    "e612"                   # out 0x12, al
    "e413"                   # in al, 0x13
    "e614"                   # out 0x14, al      (echoes what the host answered)
    "c6042500004000" "42"    # mov byte [0x400000], 0x42   (no slot: MMIO)
    "f4"                     # hlt
    "0f0b"                   # ud2              (no IDT: triple fault, shutdown)
)


class _Vm:
    def __init__(self) -> None:
        self.kvm = b.Kvm()
        self.vm = self.kvm.create_vm()
        if self.vm.check_extension(io.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            self.vm.enable_cap(io.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, io.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual = True
        else:
            self.manual = False
        self.ram = RamBlock("test", MEM)
        ram64 = self.ram.pages.view(np.uint64)
        write_page_tables(ram64, MEM)
        ram64[3, 2] = (2 << 21) | 0xE7  # map 4-6 MiB too
        self.ram.pages[CODE_PAGE, : len(PROGRAM)] = np.frombuffer(PROGRAM, dtype=np.uint8)
        self.vm.set_user_memory_region(0, io.KVM_MEM_LOG_DIRTY_PAGES, 0, MEM, self.ram.pages.ctypes.data)
        self.vcpu = self.vm.create_vcpu(0)
        set_long_mode(self.vcpu, cpl=0, rip=CODE_PAGE * 4096, rbp=0)

    def dirty_pages(self) -> list[int]:
        bm = np.zeros(MEM // 4096 // 64, dtype=np.uint64)
        self.vm.get_dirty_log(0, bm)
        if self.manual:
            self.vm.clear_dirty_log(0, 0, MEM // 4096, bm)
        return [int(i) for i in np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))]

    def close(self) -> None:
        self.vm.close()
        self.ram.close()
        self.kvm.close()


@pytest.fixture
def vm() -> Iterator[_Vm]:
    v = _Vm()
    yield v
    v.close()


@pytest.mark.kvm
def test_typed_exits_and_known_dirty_pages(vm: _Vm) -> None:
    assert vm.dirty_pages() == []
    vm.vcpu.immediate_exit = True
    assert vm.vcpu.run() == b.Interrupted()
    vm.vcpu.immediate_exit = False

    out = vm.vcpu.run()
    assert out == b.IoOut(0x12, 1, b"\x00")  # al = 0
    assert vm.dirty_pages() == [5, 7, 9]  # exactly the pages the guest wrote
    assert vm.dirty_pages() == []

    inp = vm.vcpu.run()
    assert inp == b.IoIn(0x13, 1, 1)
    vm.vcpu.set_io_in_data(b"\x5a")
    echo = vm.vcpu.run()
    assert isinstance(echo, b.IoOut) and (echo.port, echo.value) == (0x14, 0x5A)

    mmio = vm.vcpu.run()
    assert mmio == b.Mmio(0x400000, True, b"\x42")
    assert vm.vcpu.run() == b.Hlt()
    assert vm.vcpu.run() == b.Shutdown()
    assert vm.dirty_pages() == []


@pytest.mark.kvm
def test_io_in_answer_size_is_checked(vm: _Vm) -> None:
    vm.vcpu.run()
    assert isinstance(vm.vcpu.run(), b.IoIn)
    with pytest.raises(GuestError, match="expected 1"):
        vm.vcpu.set_io_in_data(b"\x00\x00")


@pytest.mark.kvm
def test_state_roundtrip_through_wrappers(vm: _Vm) -> None:
    regs = vm.vcpu.get_regs()
    assert regs.rip == CODE_PAGE * 4096
    regs.rbx = 0x1234
    vm.vcpu.set_regs(regs)
    assert vm.vcpu.get_regs().rbx == 0x1234
    sregs = vm.vcpu.get_sregs()
    assert sregs.efer & 0x500 == 0x500 and sregs.cs.l == 1
    for get, put in ((vm.vcpu.get_fpu, vm.vcpu.set_fpu), (vm.vcpu.get_xsave, vm.vcpu.set_xsave),
                     (vm.vcpu.get_xcrs, vm.vcpu.set_xcrs), (vm.vcpu.get_mp_state, vm.vcpu.set_mp_state),
                     (vm.vcpu.get_vcpu_events, vm.vcpu.set_vcpu_events)):
        value: Any = get()
        put(value)
        assert bytes(get()) == bytes(value)
    # no in-kernel irqchip: the LAPIC is not there
    with pytest.raises(b.KvmError) as info:
        vm.vcpu.get_lapic()
    assert info.value.ioctl == "KVM_GET_LAPIC"


@pytest.mark.kvm
def test_bad_memory_region_names_the_ioctl(vm: _Vm) -> None:
    with pytest.raises(b.KvmError) as info:
        vm.vm.set_user_memory_region(1, 0, 0x1001, 4096, vm.ram.pages.ctypes.data)  # unaligned gpa
    assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION" and info.value.errno == errno.EINVAL
