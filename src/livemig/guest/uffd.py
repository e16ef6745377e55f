"""userfaultfd: a guest's missing pages, faulted to a thread that places them (post-copy).

Post-copy runs the guest on the destination before all of its RAM has arrived. The RAM blocks'
mappings are registered with a userfaultfd in *missing* mode: a thread (a KVM vCPU inside
``KVM_RUN``, a portable vCPU, anything) that touches a page with no backing blocks in the kernel,
and the fault is queued on the userfaultfd as an event naming the address. Whoever owns the
userfaultfd fetches the page and places it atomically with ``UFFDIO_COPY`` (or ``UFFDIO_ZEROPAGE``),
which also wakes every thread waiting on it. A page that is already present is never faulted.

Works on the memfd (shmem) mappings of :class:`~livemig.guest.base.RamBlock` (Linux >= 4.14 for
missing mode with zero pages on shmem). Pages are removed from a block, so that they fault again,
with :func:`punch_hole` (``fallocate(PUNCH_HOLE)`` on the memfd, as QEMU's destination discards
re-dirtied pages).

One rule for Python callers: a thread that touches guest RAM while it holds the GIL must never fault,
or the thread that would place the page (which needs the GIL) waits for it forever. Touch possibly
missing pages only from calls that release the GIL (``KVM_RUN``, :func:`touch`).

Facts from Linux's ``include/uapi/linux/userfaultfd.h`` and ``Documentation/admin-guide/mm/
userfaultfd.rst``; summarised in docs/postcopy.md, "userfaultfd".
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct

from ..errors import GuestError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

NR_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFD_EVENT_PAGEFAULT = 0x12
UFFDIO_REGISTER_MODE_MISSING = 1
#: _UFFDIO_COPY and _UFFDIO_ZEROPAGE bits of uffdio_register.ioctls: what this range supports
_UFFDIO_COPY_BIT, _UFFDIO_ZEROPAGE_BIT = 1 << 0x03, 1 << 0x04
MSG_SIZE = 32  # sizeof(struct uffd_msg)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFD_API << 8) | nr


_READ, _RW = 2, 3
UFFDIO_API = _ioc(_RW, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_RW, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_READ, 0x01, 16)
UFFDIO_WAKE = _ioc(_READ, 0x02, 16)
UFFDIO_COPY = _ioc(_RW, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_RW, 0x04, 32)
#: /dev/userfaultfd's ioctl that returns a new userfaultfd (Linux >= 6.1), when the syscall is filtered
USERFAULTFD_IOC_NEW = (0 << 30) | (0 << 16) | (UFFD_API << 8) | 0x00


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class UffdError(GuestError):
    """A userfaultfd operation failed; the message names the operation and the kernel's reason."""


def _fail(what: str) -> UffdError:
    err = ctypes.get_errno()
    return UffdError(f"userfaultfd {what}: {os.strerror(err)}")


def _open() -> int:
    fd = int(_libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd >= 0:
        return fd
    first = ctypes.get_errno()
    try:  # the syscall may be filtered (seccomp) or limited to root (vm.unprivileged_userfaultfd)
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise UffdError(f"userfaultfd unavailable: {os.strerror(first)}") from None
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(os.O_CLOEXEC | os.O_NONBLOCK))
    finally:
        os.close(dev)
    if fd < 0:
        raise _fail("unavailable (/dev/userfaultfd)")
    return int(fd)


def unavailable() -> str | None:
    """Why post-copy cannot work here (``None``: a userfaultfd opens and speaks API 0xAA)."""
    try:
        Userfaultfd().close()
    except UffdError as exc:
        return str(exc)
    return None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Remove ``length`` bytes at ``offset`` (page-aligned) from the memfd ``fd``: the pages read as
    missing again (they fault when registered, read as zero otherwise). Raises UffdError."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise _fail(f"discard of {length} bytes at {offset:#x}")


def touch(addr: int, length: int, page_size: int = 4096) -> None:
    """Read one byte of every page in ``[addr, addr + length)`` with the GIL released, so that a
    missing page is faulted in (the calling thread blocks in the kernel until it is placed) while
    other Python threads run. Costs one C call per page; call it for pages not known present."""
    scratch = ctypes.c_char()
    for a in range(addr & ~(page_size - 1), addr + length, page_size):
        ctypes.memmove(ctypes.byref(scratch), a, 1)


class Userfaultfd:
    """One userfaultfd in missing mode. Thread-safe: the kernel serialises its ioctls; faults are
    read by one thread (:meth:`read_faults`). Raises :class:`UffdError` (its message in words)."""

    def __init__(self) -> None:
        self.fd = _open()
        api = _Api(UFFD_API, 0, 0)
        if _libc.ioctl(self.fd, UFFDIO_API, ctypes.byref(api)) != 0:
            exc = _fail("API handshake")
            os.close(self.fd)
            raise exc
        self._registered: list[tuple[int, int]] = []

    def register(self, addr: int, length: int) -> None:
        """Register ``[addr, addr + length)`` (page-aligned, a shared memfd mapping) in missing mode."""
        reg = _Register(_Range(addr, length), UFFDIO_REGISTER_MODE_MISSING, 0)
        if _libc.ioctl(self.fd, UFFDIO_REGISTER, ctypes.byref(reg)) != 0:
            raise _fail(f"register of {length} bytes at {addr:#x}")
        self._registered.append((addr, length))
        need = _UFFDIO_COPY_BIT | _UFFDIO_ZEROPAGE_BIT
        if reg.ioctls & need != need:
            raise UffdError("userfaultfd: this kernel cannot place pages (UFFDIO_COPY/ZEROPAGE) in shared memory")

    def unregister_all(self) -> None:
        """Unregister every range: later touches of missing pages allocate them as usual."""
        while self._registered:
            addr, length = self._registered.pop()
            rng = _Range(addr, length)
            if _libc.ioctl(self.fd, UFFDIO_UNREGISTER, ctypes.byref(rng)) != 0:
                raise _fail(f"unregister of {length} bytes at {addr:#x}")

    def copy(self, dst: int, src: int, length: int) -> bool:
        """Place ``length`` bytes from address ``src`` at the missing pages ``dst`` and wake their
        waiters. False when a page there is already present (nothing after it was copied)."""
        done = 0
        while done < length:
            c = _Copy(dst + done, src + done, length - done, 0, 0)
            if _libc.ioctl(self.fd, UFFDIO_COPY, ctypes.byref(c)) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return False
            if err != errno.EAGAIN or c.copy <= 0:
                raise UffdError(f"userfaultfd copy of {length} bytes to {dst:#x}: {os.strerror(err)}")
            done += c.copy  # interrupted part-way: place the rest
        return True

    def zeropage(self, dst: int, length: int) -> bool:
        """Place zero pages at ``[dst, dst + length)`` and wake their waiters (False: already present)."""
        z = _Zeropage(_Range(dst, length), 0, 0)
        if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, ctypes.byref(z)) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        raise UffdError(f"userfaultfd zero page at {dst:#x}: {os.strerror(err)}")

    def wake(self, addr: int, length: int) -> None:
        """Wake threads waiting on ``[addr, addr + length)`` (after the pages were placed elsewhere)."""
        rng = _Range(addr, length)
        if _libc.ioctl(self.fd, UFFDIO_WAKE, ctypes.byref(rng)) != 0:
            raise _fail(f"wake at {addr:#x}")

    def read_faults(self, timeout: float) -> list[int]:
        """Fault addresses queued now, waiting up to ``timeout`` seconds for the first ([] if none)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, MSG_SIZE * 64)
        except BlockingIOError:
            return []
        out = []
        for off in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
            if data[off] == UFFD_EVENT_PAGEFAULT:
                out.append(struct.unpack_from("=Q", data, off + 16)[0])
        return out

    def close(self) -> None:
        """Unregister (waking nothing: pages still missing are allocated on touch) and close."""
        if self.fd < 0:
            return
        try:
            self.unregister_all()
        finally:
            os.close(self.fd)
            self.fd = -1
