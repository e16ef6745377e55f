"""KvmGuest: a real KVM virtual machine behind the :class:`~livemig.guest.base.Guest` interface.

What it is
    One memfd-backed RAM block ("pc.ram") registered as KVM memory slot 0 at guest physical
    address 0; ``config.smp`` vCPUs, each driven by its own host thread; 64-bit long mode set up
    directly through ``KVM_SET_SREGS`` with page tables the host writes into guest RAM (2 MiB pages
    but for the first 2 MiB, accessed/dirty bits preset so the MMU never writes them; the code
    page read-only, so that fetching it never puts it in the dirty log). The workload programs
    (``programs/*.asm``, assembled bytes committed next to them) run at CPL3 with IOPL=3 (ring 0 is
    emulated and ~3000x slower on this nested host); ``idle`` runs at CPL0 because HLT is
    privileged, and every HLT exits to userspace where the vCPU thread sleeps (0 % CPU).

Guest physical layout (page indices)::

    0            unused
    1            PML4          (U/S, R/W, A set)
    2            PDPT
    3 .. 3+npd   page directories, 512 x 2 MiB pages each (npd = ceil(memory / 1 GiB))
    pt           4 KiB page table of the first 2 MiB (the code page read-only, see write_page_tables)
    code         the workload program (one page)
    params+v     vCPU v's parameter page (RBP points at it); see the _P_* offsets
    first_free.. RAM filled as ``config.fill`` says; the working set is carved from here

Dirty log
    ``KVM_MEM_LOG_DIRTY_PAGES`` on the slot between :meth:`start_dirty_log` and
    :meth:`stop_dirty_log`; with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (without INITIALLY_SET, so
    the first sync reports only pages written since the start) each sync is GET then CLEAR. Pages
    the host writes itself (budget refills, rate changes, :meth:`mark_dirty`) go into a host bitmap
    that is OR-ed into the next sync. Bitmap words become page indices with numpy only.

Pacing
    ``dirty`` and ``counter`` spend a step budget kept in guest RAM; at zero the guest executes
    ``OUT 0x11`` and its vCPU thread grants about 2 ms worth of steps at the current rate (read
    from the parameter page, so :meth:`set_dirty_rate` changes it live), sleeping until that much
    time has passed. Rate 0 means as fast as the vCPU can (grants of 65536 steps, no sleep).

Counter reports
    ``counter`` reports ``n >> shift`` through ``OUT 0x10`` every 2^shift steps. The host keeps,
    per vCPU, the last value reported (the state of that I/O "device", saved and loaded with the
    vCPU state) and flags any report that is not the previous one plus one.

Pause
    ``immediate_exit = 1`` on every vCPU, then SIGUSR1 to its thread (a no-op handler installed
    from the main thread by :func:`install_kick_handler`, so KVM_RUN returns EINTR); each thread
    re-enters KVM_RUN once with ``immediate_exit`` set, which completes a pending I/O exit, and
    parks on a condition variable.

State blob
    :meth:`save_state`: a versioned header with a CRC-32, then per vCPU sregs, xcrs, xsave, fpu,
    regs, mp_state, vcpu_events and the report port's state; :meth:`load_state` validates all of
    it before touching a vCPU, and a guest whose load failed half-way refuses to resume.

Diagnostics
    ``LIVEMIG_KVM_TRACE=1`` prints the duration of every pause, resume, dirty-log and state call
    to stderr (both sides of a migration). Measured figures: ``scripts/kvm-figures.py``.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from ...errors import GuestError
from ...ram.pages import bitmap_to_pages
from ..base import PAGE_SIZE, Guest, GuestConfig, RamBlock
from ..bitmap import new_bitmap, set_page_bits
from ..splitmix import GAMMA, mix64
from . import binding as b
from . import ioctls as io
from . import structs as st

BLOCK_NAME = "pc.ram"
SLOT = 0
WORKLOADS = ("idle", "dirty", "counter")
PROGRAM_DIR = Path(__file__).with_name("programs")

#: parameter page offsets (bytes), shared with programs/*.asm
_P_MAGIC = 0x00
_P_N = 0x08
_P_BUDGET = 0x10
_P_FIRST = 0x18
_P_NPAGES = 0x20
_P_MASK = 0x28
_P_SHIFT = 0x30
_P_SEED = 0x38
_P_RATE = 0x40  # host-only: this vCPU's steps per second (0 = unlimited)

PORT_REPORT = 0x10
PORT_BUDGET = 0x11

#: grants per second at a limited rate (each costs one I/O exit, ~30 us here)
_GRANTS_PER_SECOND = 500
_UNLIMITED_GRANT = 1 << 16
#: a pacing schedule further behind than this is restarted instead of caught up
_MAX_LAG = 0.05
#: reports per second the counter aims for (chooses ``shift``)
_REPORTS_PER_SECOND = 200


_TSS_ADDR = 0xFFFBD000
_PAUSE_TIMEOUT = 10.0

#: state blob: magic, version, flags, nvcpus, body length, crc32(body)
_STATE_MAGIC = b"LMKVMST\x00"
_STATE_VERSION = 1
_STATE_HEADER = struct.Struct("<8sHHIII")
_REC = struct.Struct("<II")  # tag, length
_REC_REGS, _REC_SREGS, _REC_FPU, _REC_XSAVE, _REC_XCRS, _REC_MP, _REC_EVENTS, _REC_PORTS = range(1, 9)
_PORTS = struct.Struct("<QQ")  # last report, reports seen
_RECORDS: tuple[tuple[int, str, int], ...] = (
    # load order: sregs, xcrs, xsave, fpu, regs, mp_state, events, then our port device
    (_REC_SREGS, "sregs", 312),
    (_REC_XCRS, "xcrs", 392),
    (_REC_XSAVE, "xsave", 4096),
    (_REC_FPU, "fpu", 416),
    (_REC_REGS, "regs", 144),
    (_REC_MP, "mp_state", 4),
    (_REC_EVENTS, "vcpu_events", 64),
    (_REC_PORTS, "ports", _PORTS.size),
)

#: capabilities the guest cannot work without
REQUIRED_CAPS = {
    "KVM_CAP_USER_MEMORY": io.KVM_CAP_USER_MEMORY,
    "KVM_CAP_IMMEDIATE_EXIT": io.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_MP_STATE": io.KVM_CAP_MP_STATE,
    "KVM_CAP_VCPU_EVENTS": io.KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_XSAVE": io.KVM_CAP_XSAVE,
    "KVM_CAP_XCRS": io.KVM_CAP_XCRS,
}


#: LIVEMIG_KVM_TRACE=1 prints the duration of pause, resume, dirty-log and state calls to stderr
_TRACE = os.environ.get("LIVEMIG_KVM_TRACE", "") not in ("", "0")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _traced(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    if not _TRACE:
        return fn

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            print(f"livemig kvm[{os.getpid()}]: {fn.__name__} {(time.perf_counter() - t) * 1e3:.3f} ms",
                  file=sys.stderr, flush=True)

    return wrapper


def missing_capabilities(kvm: b.Kvm) -> list[str]:
    """Names of the :data:`REQUIRED_CAPS` that ``kvm`` does not report."""
    return [name for name, cap in REQUIRED_CAPS.items() if kvm.check_extension(cap) <= 0]


def open_kvm(path: str = "/dev/kvm") -> b.Kvm:
    """Open ``path``, check the API version and the required capabilities; GuestError naming what fails."""
    kvm = b.Kvm(path)
    try:
        version = kvm.api_version()
        if version != io.KVM_API_VERSION:
            raise GuestError(f"{path}: KVM API version {version}, expected {io.KVM_API_VERSION}")
        missing = missing_capabilities(kvm)
        if missing:
            raise GuestError(f"{path}: missing KVM capabilities: {', '.join(missing)}")
    except BaseException:
        kvm.close()
        raise
    return kvm


def load_program(name: str) -> bytes:
    """The committed assembled bytes of ``programs/<name>.bin``."""
    path = PROGRAM_DIR / f"{name}.bin"
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GuestError(f"guest program '{name}' not found at {path}: {exc}") from exc


def _noop_handler(signum: int, frame: object) -> None:
    """SIGUSR1 only has to interrupt KVM_RUN; nothing to do here."""


def install_kick_handler() -> None:
    """Make SIGUSR1 interrupt KVM_RUN (a no-op handler, no SA_RESTART). Call from the main thread.

    From another thread this only checks that some handler is installed already (the default
    action would kill the process) and raises GuestError otherwise.
    """
    current = signal.getsignal(signal.SIGUSR1)
    if threading.current_thread() is threading.main_thread():
        if not callable(current):
            signal.signal(signal.SIGUSR1, _noop_handler)
        signal.siginterrupt(signal.SIGUSR1, True)
    elif not callable(current):
        raise GuestError("the first KVM guest must be created from the main thread (it installs the "
                         "SIGUSR1 handler that pauses vCPUs), or call install_kick_handler() there first")


# --- workload arithmetic (the independent reference of counter.asm) -------------------------------
def splitmix_values(seed: int, steps: np.ndarray) -> np.ndarray:
    """The value counter.asm writes at step ``m``, for every ``m`` in ``steps`` (uint64 array)."""
    with np.errstate(over="ignore"):
        return mix64(np.uint64(seed) + steps.astype(np.uint64) * np.uint64(GAMMA))


def vcpu_seed(seed: int, vcpu: int) -> int:
    """The counter seed of vCPU ``vcpu`` (distinct sequences per vCPU, all from ``config.seed``)."""
    return (seed * 0x2545F4914F6CDD1D + (vcpu + 1) * GAMMA) & (2**64 - 1)


def report_shift(rate: int) -> int:
    """Report every 2^shift steps, so a vCPU stepping ``rate`` times a second reports ~200 times.

    Unlimited (0): every 65536 steps, a few hundred reports a second at most even when the working
    set fits in the cache (~12 M steps/s). Exits are kept rare because a vCPU thread that exits
    thousands of times a second holds the GIL so often that other threads wait for the 5 ms
    switch interval (pause latency).
    """
    if rate <= 0:
        return 16
    steps = rate
    shift = 0
    while (1 << (shift + 1)) <= max(1, steps // _REPORTS_PER_SECOND):
        shift += 1
    return shift


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


def _check_config(config: GuestConfig) -> None:
    if config.workload not in WORKLOADS:
        raise GuestError(f"workload '{config.workload}': expected one of {', '.join(WORKLOADS)}")
    if not 1 <= config.smp <= 64:
        raise GuestError(f"smp {config.smp}: expected 1..64")
    if config.dirty_rate < 0:
        raise GuestError(f"dirty_rate {config.dirty_rate}: expected >= 0 pages/s (0 = unlimited)")


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


def write_page_tables(ram64: np.ndarray, memory: int, pt: int | None = None,
                      read_only: tuple[int, ...] = ()) -> None:
    """Identity-map ``memory`` bytes for user mode: PML4 at page 1, PDPT at 2, page directories from 3.

    ``ram64`` is guest RAM as a (npages, 512) uint64 view. Memory is mapped with 2 MiB pages, except
    the first 2 MiB when ``pt`` (a page index) is given: then page ``pt`` holds a 4 KiB page table
    for it, with ``read_only`` pages mapped without write access. Accessed and dirty bits are
    preset so the guest's MMU never writes the tables (they stay out of the dirty log). The code
    page must be read-only: KVM maps a page whose guest PTE is writable and dirty as writable even
    on a fetch, and so logs it as dirty.
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


class _Vcpu:
    """One vCPU, its thread and its host-side workload state."""

    def __init__(self, index: int, fd: b.VcpuFd) -> None:
        self.index = index
        self.fd = fd
        self.thread: threading.Thread | None = None
        self.parked = True
        self.next_t: float | None = None
        # the report "device": last value reported through PORT_REPORT, count seen by this process
        self.last_report = 0
        self.reports = 0
        self.violation: str | None = None


class KvmGuest(Guest):
    """A KVM VM running one of the workload programs; see the module docstring."""

    kind = "kvm"

    def __init__(self, config: GuestConfig, incoming: bool = False, kvm_path: str = "/dev/kvm",
                 manual_protect: bool | None = None) -> None:
        """``manual_protect``: use KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (None: when KVM has it)."""
        _check_config(config)
        self._want_manual = manual_protect
        super().__init__(config)
        self._layout = Layout.of(config)
        self._layout_of = config.to_json()
        self.incoming = incoming
        #: why the guest stopped on its own (shutdown, internal error, ...), else None
        self.failure: str | None = None
        self._cv = threading.Condition()
        self._want_run = False
        self._closing = False
        self._state_loaded = not incoming
        self._logging = False
        self._host_lock = threading.Lock()
        self._fill_desc = ""
        self._vcpus: list[_Vcpu] = []
        self._kvm = open_kvm(kvm_path)
        self._vm: b.VmFd | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    @property
    def layout(self) -> Layout:
        """The layout of the current config (a destination's config is replaced by the source's)."""
        key = self.config.to_json()
        if key != self._layout_of:
            self._layout, self._layout_of = Layout.of(self.config), key
        return self._layout

    # --- creation --------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, lay = self.config, self.layout
        max_vcpus = self._kvm.check_extension(io.KVM_CAP_MAX_VCPUS) or self._kvm.check_extension(
            io.KVM_CAP_NR_VCPUS)
        if max_vcpus and cfg.smp > max_vcpus:
            raise GuestError(f"smp {cfg.smp}: this KVM supports at most {max_vcpus} vCPUs")
        self._vm = vm = self._kvm.create_vm()
        has_manual = bool(vm.check_extension(io.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                          & io.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        if self._want_manual and not has_manual:
            raise GuestError("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not available on this host")
        self.manual_protect = has_manual if self._want_manual is None else self._want_manual
        if self.manual_protect:
            # not INITIALLY_SET: the first sync must report only pages written since start_dirty_log
            vm.enable_cap(io.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, io.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        if self._kvm.check_extension(io.KVM_CAP_SET_TSS_ADDR) > 0:
            vm.set_tss_addr(_TSS_ADDR)  # VMX needs it; the guest never uses a TSS
        block = RamBlock(BLOCK_NAME, cfg.memory)
        self.blocks = [block]
        if self.incoming:
            block.prefault()
        self._bitmap = new_bitmap(lay.npages)
        self._host_dirty = new_bitmap(lay.npages)
        self._ram64: np.ndarray = block.pages.view(np.uint64)  # (npages, 512)
        vm.set_user_memory_region(SLOT, 0, 0, block.size, block.pages.ctypes.data)
        for i in range(cfg.smp):
            self._vcpus.append(_Vcpu(i, vm.create_vcpu(i)))
        if not self.incoming:
            self._load_workload()
        for v in self._vcpus:
            v.thread = threading.Thread(target=self._vcpu_main, args=(v,), name=f"kvm-vcpu{v.index}",
                                        daemon=True)
            v.thread.start()

    def _load_workload(self) -> None:
        """Fill RAM, write page tables, program and parameters; set every vCPU's entry state."""
        from ..fill import fill_pages

        cfg, lay = self.config, self.layout
        pages = self.blocks[0].pages
        self._fill_desc = fill_pages(pages[lay.first_free:], cfg.fill, cfg.seed)
        ram = self._ram64
        write_page_tables(ram, cfg.memory, pt=lay.pt, read_only=(lay.code,))
        code = load_program(cfg.workload)
        pages[lay.code, : len(code)] = np.frombuffer(code, dtype=np.uint8)
        rate = cfg.dirty_rate
        per_vcpu = -(-rate // cfg.smp) if rate else 0
        shift = report_shift(per_vcpu)
        for v in self._vcpus:
            first, count = lay.vcpu_pages(cfg.smp, v.index)
            p = ram[lay.params + v.index]
            p[_P_MAGIC // 8] = int.from_bytes(b"LMKVMPRM", "little")
            p[_P_N // 8] = 0
            p[_P_BUDGET // 8] = 0
            p[_P_FIRST // 8] = first
            p[_P_NPAGES // 8] = count
            p[_P_MASK // 8] = (1 << shift) - 1
            p[_P_SHIFT // 8] = shift
            p[_P_SEED // 8] = vcpu_seed(cfg.seed, v.index)
            p[_P_RATE // 8] = per_vcpu
            self._set_entry_state(v)

    def _set_entry_state(self, v: _Vcpu) -> None:
        set_long_mode(v.fd, cpl=0 if self.config.workload == "idle" else 3,
                      rip=self.layout.code * PAGE_SIZE, rbp=(self.layout.params + v.index) * PAGE_SIZE)

    # --- vCPU threads ----------------------------------------------------------------------------
    def _vcpu_main(self, v: _Vcpu) -> None:
        try:
            self._vcpu_loop(v)
        except BaseException as exc:  # report, never die silently
            self._fail(v, f"vCPU {v.index}: {exc}")
            with self._cv:
                v.parked = True
                self._cv.notify_all()

    def _vcpu_loop(self, v: _Vcpu) -> None:
        fd = v.fd
        cv = self._cv
        while True:
            with cv:
                if not self._want_run or self._closing:
                    v.parked = True
                    cv.notify_all()
                    while not self._want_run and not self._closing:
                        cv.wait()
                    if self._closing:
                        return
                    v.parked = False
            exit_ = fd.run()
            self._handle_exit(v, exit_)
            if not self._want_run:
                # finish a pending I/O exit (RIP past the OUT) without running guest code
                fd.immediate_exit = True
                done = fd.run()
                if not isinstance(done, b.Interrupted):
                    self._handle_exit(v, done)

    def _handle_exit(self, v: _Vcpu, exit_: b.Exit) -> None:
        if isinstance(exit_, b.IoOut):
            if exit_.port == PORT_BUDGET:
                self._refill(v)
                return
            if exit_.port == PORT_REPORT:
                self._report(v, exit_.value)
                return
            self._fail(v, f"vCPU {v.index}: unexpected OUT to port {exit_.port:#x}")
        elif isinstance(exit_, b.Interrupted):
            return
        elif isinstance(exit_, b.Hlt):
            with self._cv:  # sleep (0 % CPU) until paused or closed
                while self._want_run and not self._closing:
                    self._cv.wait()
        elif isinstance(exit_, b.Shutdown):
            self._fail(v, f"vCPU {v.index}: guest shut down (KVM_EXIT_SHUTDOWN, triple fault) "
                          f"at rip {self._rip(v)}")
        elif isinstance(exit_, b.InternalError):
            self._fail(v, f"vCPU {v.index}: KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror "
                          f"{exit_.suberror}, data {[hex(d) for d in exit_.data]}) at rip {self._rip(v)}")
        elif isinstance(exit_, b.FailEntry):
            self._fail(v, f"vCPU {v.index}: entry failed (KVM_EXIT_FAIL_ENTRY, reason "
                          f"{exit_.reason:#x}) at rip {self._rip(v)}")
        elif isinstance(exit_, b.Mmio):
            self._fail(v, f"vCPU {v.index}: guest accessed unmapped address {exit_.addr:#x} "
                          f"(KVM_EXIT_MMIO) at rip {self._rip(v)}")
        else:
            self._fail(v, f"vCPU {v.index}: unexpected exit {exit_} at rip {self._rip(v)}")

    def _rip(self, v: _Vcpu) -> str:
        try:
            return hex(v.fd.get_regs().rip)
        except GuestError:
            return "?"

    def _fail(self, v: _Vcpu, why: str) -> None:
        """Stop the whole guest: one vCPU cannot go on."""
        with self._cv:
            if self.failure is None:
                self.failure = why
            self._want_run = False
            for other in self._vcpus:
                other.fd.immediate_exit = True
            self._cv.notify_all()
        self._kick(skip=v)

    def _refill(self, v: _Vcpu) -> None:
        """Grant the next budget of steps, sleeping to hold the rate read from guest RAM."""
        p = self._ram64[self.layout.params + v.index]
        rate = int(p[_P_RATE // 8])
        if rate == 0:
            grant = _UNLIMITED_GRANT
        else:
            grant = max(1, rate // _GRANTS_PER_SECOND)
            now = time.monotonic()
            if v.next_t is None or now - v.next_t > _MAX_LAG:
                v.next_t = now
            v.next_t += grant / rate
            delay = v.next_t - now
            if delay > 0:
                with self._cv:
                    self._cv.wait_for(lambda: not self._want_run or self._closing, timeout=delay)
        p[_P_BUDGET // 8] = grant
        self._mark_host_dirty(np.array([self.layout.params + v.index], dtype=np.int64))

    def _report(self, v: _Vcpu, value: int) -> None:
        expected = (v.last_report + 1) & 0xFFFFFFFF
        if value != expected and v.violation is None:
            v.violation = (f"vCPU {v.index}: counter reported {value} after {v.last_report} "
                           f"(expected {expected}: a gap or a repeat)")
        v.last_report = value
        v.reports += 1

    def _kick(self, skip: _Vcpu | None = None) -> None:
        for v in self._vcpus:
            t = v.thread
            if v is not skip and t is not None and t.ident is not None and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    # --- Guest interface: vCPUs ------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPUs (same as :meth:`resume`)."""
        self.resume()

    @_traced
    def pause(self) -> None:
        """Stop every vCPU; returns when all are parked (pending I/O completed). GuestError on failure."""
        with self._cv:
            if self._want_run:
                self._want_run = False
                for v in self._vcpus:
                    v.fd.immediate_exit = True
                self._cv.notify_all()
        self._kick()
        with self._cv:
            stopped = self._cv.wait_for(lambda: all(v.parked for v in self._vcpus), timeout=_PAUSE_TIMEOUT)
        if not stopped:
            raise GuestError(f"vCPUs did not stop within {_PAUSE_TIMEOUT:.0f} s")
        self._raise_failure()

    @_traced
    def resume(self) -> None:
        """Let the vCPUs run. GuestError on a destination without loaded state, or after a failure."""
        self._raise_failure()
        if not self._state_loaded:
            raise GuestError("KVM guest has no complete vCPU state: load_state() must succeed before resume()")
        if self._closing:
            raise GuestError("KVM guest is closed")
        with self._cv:
            if self._want_run:
                return
            self._cv.wait_for(lambda: all(v.parked for v in self._vcpus), timeout=_PAUSE_TIMEOUT)
            for v in self._vcpus:
                v.fd.immediate_exit = False
                v.next_t = None
            self._want_run = True
            self._cv.notify_all()

    @property
    def running(self) -> bool:
        return self._want_run

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise GuestError(f"KVM guest stopped: {self.failure}")

    # --- Guest interface: dirty log --------------------------------------------------------------
    def _vm_fd(self) -> b.VmFd:
        if self._vm is None:
            raise GuestError("KVM guest is closed")
        return self._vm

    @_traced
    def start_dirty_log(self) -> None:
        vm = self._vm_fd()
        block = self.blocks[0]
        if self._logging:
            vm.get_dirty_log(SLOT, self._bitmap)  # discard what was logged so far
            if self.manual_protect:
                vm.clear_dirty_log(SLOT, 0, block.npages, self._bitmap)
        else:
            vm.set_user_memory_region(SLOT, io.KVM_MEM_LOG_DIRTY_PAGES, 0, block.size, block.pages.ctypes.data)
            self._logging = True
        with self._host_lock:
            self._host_dirty[:] = 0

    @_traced
    def sync_dirty_log(self) -> dict[str, np.ndarray]:
        """``{"pc.ram": sorted int64 page indices}`` written by the guest or the host since the last sync.

        Cost: one KVM_GET_DIRTY_LOG (+ KVM_CLEAR_DIRTY_LOG when something was dirty) and numpy work
        proportional to the bitmap size and the dirty words; no Python loop over pages.
        """
        if not self._logging:
            raise GuestError("sync_dirty_log() before start_dirty_log()")
        vm = self._vm_fd()
        bm = self._bitmap
        vm.get_dirty_log(SLOT, bm)
        if self.manual_protect and bm.any():
            vm.clear_dirty_log(SLOT, 0, self.blocks[0].npages, bm)
        with self._host_lock:
            bm |= self._host_dirty
            self._host_dirty[:] = 0
        return {BLOCK_NAME: bitmap_to_pages(bm, self.blocks[0].npages)}

    @_traced
    def stop_dirty_log(self) -> None:
        if not self._logging:
            return
        block = self.blocks[0]
        self._vm_fd().set_user_memory_region(SLOT, 0, 0, block.size, block.pages.ctypes.data)
        self._logging = False

    def mark_dirty(self, block: str, pages: np.ndarray) -> None:
        """Record host writes to ``pages`` of ``block``; they appear in the next sync."""
        npages = self.block(block).npages
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= npages):
            raise GuestError(f"mark_dirty: page indices must lie in 0..{npages - 1} of block '{block}'")
        self._mark_host_dirty(idx)

    def _mark_host_dirty(self, idx: np.ndarray) -> None:
        with self._host_lock:
            set_page_bits(self._host_dirty, idx)

    # --- extra control ---------------------------------------------------------------------------
    def set_dirty_rate(self, rate: int) -> None:
        """Change the workload's steps (pages written) per second live; 0 = unlimited.

        Writes each vCPU's rate into its parameter page (marked dirty). A budget already granted
        is cut to one step so the new rate applies within one grant (a guest decrement racing this
        write can keep the old budget: at most 65536 steps at the old rate).
        """
        if rate < 0:
            raise GuestError(f"dirty rate {rate}: expected >= 0 pages/s (0 = unlimited)")
        self.config.dirty_rate = rate
        per_vcpu = -(-rate // self.config.smp) if rate else 0
        pages = []
        for v in self._vcpus:
            p = self._ram64[self.layout.params + v.index]
            p[_P_RATE // 8] = per_vcpu
            if int(p[_P_BUDGET // 8]) > 1:
                p[_P_BUDGET // 8] = 1
            pages.append(self.layout.params + v.index)
        self._mark_host_dirty(np.array(pages, dtype=np.int64))

    # --- Guest interface: CPU state --------------------------------------------------------------
    @_traced
    def save_state(self) -> bytes:
        """vCPU state (sregs, xcrs, xsave, fpu, regs, mp_state, events) and the report port, one blob.

        Format: header ``<8sHHIII`` (magic ``LMKVMST\\0``, version 1, flags 0, vCPU count, body
        length, CRC-32 of the body), then per vCPU the records (tag u32, length u32, bytes) in
        load order. Only for a paused guest.
        """
        if self._want_run:
            raise GuestError("save_state() needs a paused guest")
        self._raise_failure()
        body = bytearray()
        for v in self._vcpus:
            fd = v.fd
            blobs: dict[int, bytes] = {
                _REC_SREGS: bytes(fd.get_sregs()), _REC_XCRS: bytes(fd.get_xcrs()),
                _REC_XSAVE: bytes(fd.get_xsave()), _REC_FPU: bytes(fd.get_fpu()),
                _REC_REGS: bytes(fd.get_regs()), _REC_MP: bytes(fd.get_mp_state()),
                _REC_EVENTS: bytes(fd.get_vcpu_events()),
                _REC_PORTS: _PORTS.pack(v.last_report, v.reports),
            }
            for tag, _name, size in _RECORDS:
                data = blobs[tag]
                assert len(data) == size
                body += _REC.pack(tag, size) + data
        header = _STATE_HEADER.pack(_STATE_MAGIC, _STATE_VERSION, 0, len(self._vcpus), len(body),
                                    zlib.crc32(body))
        return header + bytes(body)

    def parse_state(self, blob: bytes) -> list[dict[int, bytes]]:
        """Validate a :meth:`save_state` blob for this guest; per vCPU {tag: bytes}. GuestError if malformed."""
        h = _STATE_HEADER.size
        if len(blob) < h:
            raise GuestError(f"KVM state blob: {len(blob)} bytes, shorter than its {h}-byte header")
        magic, version, flags, nvcpus, length, crc = _STATE_HEADER.unpack_from(blob)
        if magic != _STATE_MAGIC:
            raise GuestError(f"KVM state blob: magic {magic!r}, expected {_STATE_MAGIC!r}")
        if version != _STATE_VERSION:
            raise GuestError(f"KVM state blob: version {version}, expected {_STATE_VERSION}")
        if flags != 0:
            raise GuestError(f"KVM state blob: flags {flags:#x}, expected 0")
        if nvcpus != len(self._vcpus):
            raise GuestError(f"KVM state blob: {nvcpus} vCPUs, this guest has smp {len(self._vcpus)}")
        if len(blob) - h != length:
            raise GuestError(f"KVM state blob: body of {len(blob) - h} bytes, header says {length}")
        body = memoryview(blob)[h:]
        if zlib.crc32(body) != crc:
            raise GuestError(f"KVM state blob: CRC-32 {zlib.crc32(body):#010x}, header says {crc:#010x}")
        out: list[dict[int, bytes]] = []
        pos = 0
        for i in range(nvcpus):
            recs: dict[int, bytes] = {}
            for tag, name, size in _RECORDS:
                if pos + _REC.size > len(body):
                    raise GuestError(f"KVM state blob: vCPU {i} record {name} truncated")
                got_tag, got_len = _REC.unpack_from(body, pos)
                if got_tag != tag or got_len != size:
                    raise GuestError(f"KVM state blob: vCPU {i} record (tag {got_tag}, {got_len} bytes), "
                                     f"expected {name} (tag {tag}, {size} bytes)")
                pos += _REC.size
                if pos + size > len(body):
                    raise GuestError(f"KVM state blob: vCPU {i} record {name} truncated")
                recs[tag] = bytes(body[pos: pos + size])
                pos += size
            out.append(recs)
        if pos != len(body):
            raise GuestError(f"KVM state blob: {len(body) - pos} trailing bytes")
        return out

    @_traced
    def load_state(self, blob: bytes) -> None:
        """Validate the whole blob, then load it into the (paused) vCPUs. GuestError if malformed."""
        if self._want_run:
            raise GuestError("load_state() needs a paused guest")
        records = self.parse_state(blob)
        self._state_loaded = False  # a load that fails half-way leaves a guest that must not run
        for v, recs in zip(self._vcpus, records, strict=True):
            fd = v.fd
            fd.set_sregs(st.Sregs.from_buffer_copy(recs[_REC_SREGS]))
            fd.set_xcrs(st.Xcrs.from_buffer_copy(recs[_REC_XCRS]))
            fd.set_xsave(st.Xsave.from_buffer_copy(recs[_REC_XSAVE]))
            fd.set_fpu(st.Fpu.from_buffer_copy(recs[_REC_FPU]))
            fd.set_regs(st.Regs.from_buffer_copy(recs[_REC_REGS]))
            fd.set_mp_state(st.MpState.from_buffer_copy(recs[_REC_MP]))
            fd.set_vcpu_events(st.VcpuEvents.from_buffer_copy(recs[_REC_EVENTS]))
            last, _seen = _PORTS.unpack(recs[_REC_PORTS])
            v.last_report = last
            v.reports = 0
            v.violation = None
        self._state_loaded = True

    # --- workload ---------------------------------------------------------------------------------
    def progress(self) -> int:
        """Steps done by the workload (sum over vCPUs of ``n`` in guest RAM); 0 for ``idle``."""
        if self.config.workload == "idle" or self._vm is None:
            return 0
        lay = self.layout
        return int(self._ram64[lay.params: lay.params + len(self._vcpus), _P_N // 8].sum())

    def reports(self) -> list[tuple[int, int]]:
        """Per vCPU: (last value reported through the counter port, reports seen by this process)."""
        return [(v.last_report, v.reports) for v in self._vcpus]

    def check_workload(self) -> None:
        """Check the workload against its reference; GuestError naming the first mismatch.

        ``counter``: the parameter pages hold what the layout says; the values of the last (up to
        4096) steps of each vCPU are where they belong and equal the splitmix64 reference computed
        here; every report this process saw followed the previous one by exactly one (on a
        destination, starting from the last report of the source); the last report matches ``n``.
        ``dirty``: the last step's value is in its slot. Pauses a running guest for the check.
        """
        self._raise_failure()
        if self.config.workload == "idle":
            return
        was_running = self._want_run
        if was_running:
            self.pause()
        try:
            self._check_paused()
        finally:
            if was_running:
                self.resume()

    def _check_paused(self) -> None:
        cfg, lay = self.config, self.layout
        ram = self._ram64
        flat = ram.reshape(-1)
        counter = cfg.workload == "counter"
        for v in self._vcpus:
            p = ram[lay.params + v.index]
            first, count = lay.vcpu_pages(cfg.smp, v.index)
            want = {_P_FIRST: first, _P_NPAGES: count}
            if counter:
                want[_P_SEED] = vcpu_seed(cfg.seed, v.index)
                shift = int(p[_P_SHIFT // 8])
                if shift > 40:
                    raise GuestError(f"vCPU {v.index}: counter shift {shift} in guest RAM, expected <= 40")
                want[_P_MASK] = (1 << shift) - 1
            for off, value in want.items():
                if int(p[off // 8]) != value:
                    raise GuestError(f"vCPU {v.index}: parameter at {off:#x} is {int(p[off // 8])}, "
                                     f"expected {value}")
            n = int(p[_P_N // 8])
            k = min(n, count * 512, 4096)
            steps = np.arange(n - k, n, dtype=np.uint64)
            slots = (first + steps % np.uint64(count)) * np.uint64(512) + (steps // np.uint64(count)) % np.uint64(512)
            got = flat[slots.astype(np.int64)]
            expect = splitmix_values(vcpu_seed(cfg.seed, v.index), steps) if counter else steps
            bad = np.flatnonzero(got != expect)
            if bad.size:
                m = int(steps[bad[0]])
                raise GuestError(f"vCPU {v.index}: step {m} of {n}: guest RAM holds {int(got[bad[0]]):#x}, "
                                 f"reference {int(expect[bad[0]]):#x}")
            if counter:
                if v.violation is not None:
                    raise GuestError(v.violation)
                top = (n >> shift) & 0xFFFFFFFF
                allowed = {top}
                if n and n & ((1 << shift) - 1) == 0:
                    allowed.add((top - 1) & 0xFFFFFFFF)  # paused between the commit and its OUT
                if v.last_report not in allowed:
                    raise GuestError(f"vCPU {v.index}: last report {v.last_report} does not match "
                                     f"n = {n} (expected {sorted(allowed)})")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"manual_dirty_protect": self.manual_protect if self._vm else None,
                  "cpl": 0 if self.config.workload == "idle" else 3,
                  "fill_description": self._fill_desc,
                  "working_set": self.layout.working_set})
        return d

    # --- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPU threads, close vCPU and VM fds, release RAM. Idempotent."""
        with self._cv:
            self._closing = True
            self._want_run = False
            for v in self._vcpus:
                v.fd.immediate_exit = True
            self._cv.notify_all()
        self._kick()
        for v in self._vcpus:
            if v.thread is not None and v.thread is not threading.current_thread():
                v.thread.join(timeout=_PAUSE_TIMEOUT)
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        self._ram64 = np.empty((0, 512), dtype=np.uint64)
        for block in self.blocks:
            block.close()
        self.blocks = []
        self._kvm.close()

    def __enter__(self) -> KvmGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
