"""KvmGuest: a real KVM virtual machine behind the :class:`~livemig.guest.base.Guest` interface.

One memfd-backed RAM block ("pc.ram") registered as KVM memory slot 0 at guest physical address
0; ``config.smp`` vCPUs, each driven by its own host thread; 64-bit long mode set up directly
through ``KVM_SET_SREGS``. The workload programs (``programs/*.asm``, assembled bytes committed
next to them) run at CPL3 with IOPL=3 (ring 0 is emulated and ~3000x slower on a nested host);
``idle`` runs at CPL0 because HLT is privileged. The facts this relies on: docs/kvm.md.

The parts, each in its own module:

* :mod:`.longmode` -- the physical layout, page tables, segment and control registers;
* :mod:`.runner` -- the vCPU threads, their exits, pause and resume;
* :mod:`.dirtylog` -- the slot's dirty log plus the host's own writes;
* :mod:`.state` -- the vCPU state blob (pure encode/decode with a CRC-32);
* :mod:`.protocol` -- parameter pages, ports, pacing and reports of the guest programs, and the
  reference their RAM is checked against;
* this module -- the :class:`KvmGuest` that ties them together, and :func:`open_kvm`.

Diagnostics: ``LIVEMIG_KVM_TRACE=1`` prints the duration of every pause, resume, dirty-log and
state call to stderr (both sides of a migration). Measured figures: ``scripts/kvm-figures.py``.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np

from ...errors import GuestError
from ..base import PAGE_SIZE, Guest, GuestConfig, RamBlock
from . import binding as b
from . import ioctls as io
from . import protocol as pr
from . import structs as st
from .dirtylog import SlotDirtyLog
from .longmode import TSS_ADDR, Layout, set_long_mode, write_page_tables
from .runner import Vcpu, VcpuRunner
from .state import decode_state, encode_state

BLOCK_NAME = "pc.ram"
SLOT = 0

#: capabilities the guest cannot work without (docs/kvm.md, "Capabilities")
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


def _check_config(config: GuestConfig) -> None:
    if config.workload not in pr.WORKLOADS:
        raise GuestError(f"workload '{config.workload}': expected one of {', '.join(pr.WORKLOADS)}")
    if not 1 <= config.smp <= 64:
        raise GuestError(f"smp {config.smp}: expected 1..64")
    if config.dirty_rate < 0:
        raise GuestError(f"dirty_rate {config.dirty_rate}: expected >= 0 pages/s (0 = unlimited)")


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
        self._state_loaded = not incoming
        self._fill_desc = ""
        #: the last value progress() read (returned while a parameter page is missing in post-copy)
        self._progress = 0
        self._runner = VcpuRunner([], {pr.PORT_BUDGET: self._grant, pr.PORT_REPORT: self._report},
                                  self.throttle)
        self.throttle.kick = self._runner.throttle_kick
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

    @property
    def failure(self) -> str | None:
        """Why the guest stopped on its own (shutdown, internal error, ...), else None."""
        return self._runner.failure

    @property
    def _vcpus(self) -> list[Vcpu]:
        return self._runner.vcpus

    # --- creation --------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.config
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
            vm.set_tss_addr(TSS_ADDR)  # VMX needs it; the guest never uses a TSS
        block = RamBlock(BLOCK_NAME, cfg.memory)
        self.blocks = [block]
        if self.incoming:
            block.prefault()
        self._ram64: np.ndarray = block.pages.view(np.uint64)  # (npages, 512)
        self._log = SlotDirtyLog(SLOT, block, self.manual_protect)
        self._log.register(vm)
        for i in range(cfg.smp):
            self._vcpus.append(Vcpu(i, vm.create_vcpu(i)))
        if not self.incoming:
            self._load_workload()
        self._runner.start_threads()

    def _load_workload(self) -> None:
        """Fill RAM, write page tables, program and parameters; set every vCPU's entry state."""
        from ..fill import fill_pages

        cfg, lay = self.config, self.layout
        pages = self.blocks[0].pages
        self._fill_desc = fill_pages(pages[lay.first_free:], cfg.fill, cfg.seed)
        write_page_tables(self._ram64, cfg.memory, pt=lay.pt, read_only=(lay.code,))
        code = pr.load_program(cfg.workload)
        pages[lay.code, : len(code)] = np.frombuffer(code, dtype=np.uint8)
        pr.write_params(self._ram64, lay, cfg)
        for v in self._vcpus:
            set_long_mode(v.fd, cpl=0 if cfg.workload == "idle" else 3,
                          rip=lay.code * PAGE_SIZE, rbp=(lay.params + v.index) * PAGE_SIZE)

    # --- port handlers (vCPU threads) ------------------------------------------------------------
    def _grant(self, v: Vcpu, _value: int) -> None:
        """PORT_BUDGET: grant the next budget of steps, sleeping to hold the rate read from guest RAM."""
        page = self.layout.params + v.index
        block = self.blocks[0]
        if block.present is not None:  # post-copy; present in practice: the program just wrote its budget
            block.ensure_pages(np.array([page]))
        p = self._ram64[page]
        grant, v.next_t, delay = pr.next_grant(int(p[pr.P_RATE // 8]), v.next_t, time.monotonic())
        if delay > 0:
            self._runner.sleep(delay)
        p[pr.P_BUDGET // 8] = grant
        self._log.mark(np.array([page], dtype=np.int64))

    def _report(self, v: Vcpu, value: int) -> None:
        """PORT_REPORT: the counter's report of ``n >> shift``."""
        v.port.record(value)

    # --- Guest interface: vCPUs ------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPUs (same as :meth:`resume`)."""
        self.resume()

    @_traced
    def pause(self) -> None:
        """Stop every vCPU; returns when all are parked (pending I/O completed). GuestError on failure."""
        self._runner.pause()

    @_traced
    def resume(self) -> None:
        """Let the vCPUs run. GuestError on a destination without loaded state, or after a failure."""
        self._runner.raise_failure()
        if not self._state_loaded:
            raise GuestError("KVM guest has no complete vCPU state: load_state() must succeed before resume()")
        if self._runner.closing:
            raise GuestError("KVM guest is closed")
        self._runner.resume()

    @property
    def running(self) -> bool:
        return self._runner.want_run

    # --- Guest interface: dirty log --------------------------------------------------------------
    def _vm_fd(self) -> b.VmFd:
        if self._vm is None:
            raise GuestError("KVM guest is closed")
        return self._vm

    @_traced
    def start_dirty_log(self) -> None:
        self._log.start(self._vm_fd())

    @_traced
    def sync_dirty_log(self) -> dict[str, np.ndarray]:
        """``{"pc.ram": sorted int64 page indices}`` written by the guest or the host since the last sync."""
        if not self._log.logging:
            raise GuestError("sync_dirty_log() before start_dirty_log()")
        return {BLOCK_NAME: self._log.sync(self._vm_fd())}

    @_traced
    def stop_dirty_log(self) -> None:
        if self._log.logging:
            self._log.stop(self._vm_fd())

    def mark_dirty(self, block: str, pages: np.ndarray) -> None:
        """Record host writes to ``pages`` of ``block``; they appear in the next sync."""
        npages = self.block(block).npages
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= npages):
            raise GuestError(f"mark_dirty: page indices must lie in 0..{npages - 1} of block '{block}'")
        self._log.mark(idx)

    def set_dirty_rate(self, rate: int) -> None:
        """Change the workload's steps (pages written) per second live; 0 = unlimited.

        Writes each vCPU's rate into its parameter page (marked dirty); see :func:`.protocol.set_rate`.
        """
        if rate < 0:
            raise GuestError(f"dirty rate {rate}: expected >= 0 pages/s (0 = unlimited)")
        self.config.dirty_rate = rate
        self.blocks[0].ensure_range(self.layout.params, self.config.smp)
        self._log.mark(pr.set_rate(self._ram64, self.layout, self.config.smp, rate))

    # --- Guest interface: CPU state --------------------------------------------------------------
    @_traced
    def save_state(self) -> bytes:
        """vCPU state (sregs, xcrs, xsave, fpu, regs, mp_state, events) and the report port, one blob
        (format: :mod:`.state`). Only for a paused guest."""
        if self.running:
            raise GuestError("save_state() needs a paused guest")
        self._runner.raise_failure()
        records = []
        for v in self._vcpus:
            fd = v.fd
            records.append({
                "sregs": bytes(fd.get_sregs()), "xcrs": bytes(fd.get_xcrs()), "xsave": bytes(fd.get_xsave()),
                "fpu": bytes(fd.get_fpu()), "regs": bytes(fd.get_regs()), "mp_state": bytes(fd.get_mp_state()),
                "vcpu_events": bytes(fd.get_vcpu_events()), "ports": v.port.save(),
            })
        return encode_state(records)

    def parse_state(self, blob: bytes) -> list[dict[str, bytes]]:
        """Validate a :meth:`save_state` blob for this guest; per vCPU {record name: bytes}. GuestError if malformed."""
        return decode_state(blob, len(self._vcpus))

    @_traced
    def load_state(self, blob: bytes) -> None:
        """Validate the whole blob, then load it into the (paused) vCPUs. GuestError if malformed."""
        if self.running:
            raise GuestError("load_state() needs a paused guest")
        records = self.parse_state(blob)
        self._state_loaded = False  # a load that fails half-way leaves a guest that must not run
        for v, recs in zip(self._vcpus, records, strict=True):
            fd = v.fd  # in the blob's (load) order
            fd.set_sregs(st.Sregs.from_buffer_copy(recs["sregs"]))
            fd.set_xcrs(st.Xcrs.from_buffer_copy(recs["xcrs"]))
            fd.set_xsave(st.Xsave.from_buffer_copy(recs["xsave"]))
            fd.set_fpu(st.Fpu.from_buffer_copy(recs["fpu"]))
            fd.set_regs(st.Regs.from_buffer_copy(recs["regs"]))
            fd.set_mp_state(st.MpState.from_buffer_copy(recs["mp_state"]))
            fd.set_vcpu_events(st.VcpuEvents.from_buffer_copy(recs["vcpu_events"]))
            v.port.load(recs["ports"])
        self._state_loaded = True

    # --- workload ---------------------------------------------------------------------------------
    def progress(self) -> int:
        """Steps done by the workload (sum over vCPUs of ``n`` in guest RAM); 0 for ``idle``.

        Never waits: while a parameter page is missing (post-copy) it returns the last value it read.
        """
        if self.config.workload == "idle" or self._vm is None:
            return 0
        params = self.layout.params + np.arange(len(self._vcpus))
        if not self.blocks[0].pages_present(params):
            return self._progress
        self._progress = pr.steps_done(self._ram64, self.layout, len(self._vcpus))
        return self._progress

    def reports(self) -> list[tuple[int, int]]:
        """Per vCPU: (last value reported through the counter port, reports seen by this process)."""
        return [(v.port.last, v.port.seen) for v in self._vcpus]

    def check_workload(self) -> None:
        """Check the workload against its reference (:func:`.protocol.check_vcpu`); GuestError naming
        the first mismatch. Pauses a running guest for the check. In post-copy it waits for the
        missing pages it reads (never call it from the thread that places pages)."""
        self._runner.raise_failure()
        if self.config.workload == "idle":
            return
        was_running = self.running
        if was_running:
            self.pause()
        try:
            for v in self._vcpus:
                pr.check_vcpu(self._ram64, self.layout, self.config, v.port, self.blocks[0].ensure_pages)
        finally:
            if was_running:
                self.resume()

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
        self.throttle.close()
        self._runner.close()
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
