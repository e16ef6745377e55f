"""How the host talks to the guest programs (``programs/*.asm``): parameter pages, I/O ports,
pacing grants, counter reports, and the reference the programs' RAM is checked against.

Parameter page
    vCPU ``v``'s page ``layout.params + v`` (RBP points at it), little-endian u64 at byte offsets
    :data:`P_MAGIC` .. :data:`P_RATE`; the same offsets are ``equ`` constants in the ``.asm``
    files. ``n`` (steps done) is the workload's state: it lives in guest RAM and migrates with it.

Pacing (``dirty`` and ``counter``)
    The program spends a step budget kept in its parameter page; at zero it executes
    ``OUT PORT_BUDGET`` and its vCPU thread grants about 2 ms worth of steps at the rate read from
    the parameter page (so a rate change applies live), sleeping until that much time has passed
    (:func:`next_grant`). Rate 0 means as fast as the vCPU can (grants of 65536 steps, no sleep).

Counter reports
    ``counter`` reports ``n >> shift`` through ``OUT PORT_REPORT`` every 2^shift steps. The host
    keeps, per vCPU, the last value reported (:class:`ReportPort`, the state of that I/O "device",
    saved and loaded with the vCPU state) and flags any report that is not the previous one plus
    one.

``idle`` halts forever at CPL0 (HLT is privileged); the others run at CPL3 (docs/kvm.md, "Why CPL3").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...errors import GuestError
from ..base import GuestConfig
from ..splitmix import GAMMA, mix64
from .longmode import Layout

WORKLOADS = ("idle", "dirty", "counter")
PROGRAM_DIR = Path(__file__).with_name("programs")

#: parameter page offsets (bytes), shared with programs/*.asm
P_MAGIC = 0x00
P_N = 0x08
P_BUDGET = 0x10
P_FIRST = 0x18
P_NPAGES = 0x20
P_MASK = 0x28
P_SHIFT = 0x30
P_SEED = 0x38
P_RATE = 0x40  # host-only: this vCPU's steps per second (0 = unlimited)
PARAMS_MAGIC = int.from_bytes(b"LMKVMPRM", "little")

PORT_REPORT = 0x10
PORT_BUDGET = 0x11

#: grants per second at a limited rate (each costs one I/O exit, ~30 us here)
GRANTS_PER_SECOND = 500
UNLIMITED_GRANT = 1 << 16
#: a pacing schedule further behind than this (seconds) is restarted instead of caught up
MAX_LAG = 0.05
#: reports per second the counter aims for (chooses ``shift``)
REPORTS_PER_SECOND = 200


def load_program(name: str) -> bytes:
    """The committed assembled bytes of ``programs/<name>.bin``; GuestError if missing."""
    path = PROGRAM_DIR / f"{name}.bin"
    try:
        return path.read_bytes()
    except OSError as exc:
        raise GuestError(f"guest program '{name}' not found at {path}: {exc}") from exc


# --- workload arithmetic (the independent reference of counter.asm) -------------------------------
def splitmix_values(seed: int, steps: np.ndarray) -> np.ndarray:
    """The value counter.asm writes at step ``m``, ``mix64(seed + m * GAMMA)``, for every ``m`` in
    ``steps`` (uint64 array, same shape out)."""
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
    shift = 0
    while (1 << (shift + 1)) <= max(1, rate // REPORTS_PER_SECOND):
        shift += 1
    return shift


def per_vcpu_rate(rate: int, smp: int) -> int:
    """Each vCPU's share of ``rate`` steps per second (rounded up; 0 stays unlimited)."""
    return -(-rate // smp) if rate else 0


# --- parameter pages -------------------------------------------------------------------------------
def write_params(ram64: np.ndarray, layout: Layout, config: GuestConfig) -> None:
    """Write every vCPU's parameter page for a fresh start (n = 0, no budget) into ``ram64``
    (guest RAM as (npages, 512) uint64)."""
    per_vcpu = per_vcpu_rate(config.dirty_rate, config.smp)
    shift = report_shift(per_vcpu)
    for v in range(config.smp):
        first, count = layout.vcpu_pages(config.smp, v)
        p = ram64[layout.params + v]
        p[P_MAGIC // 8] = PARAMS_MAGIC
        p[P_N // 8] = 0
        p[P_BUDGET // 8] = 0
        p[P_FIRST // 8] = first
        p[P_NPAGES // 8] = count
        p[P_MASK // 8] = (1 << shift) - 1
        p[P_SHIFT // 8] = shift
        p[P_SEED // 8] = vcpu_seed(config.seed, v)
        p[P_RATE // 8] = per_vcpu


def set_rate(ram64: np.ndarray, layout: Layout, smp: int, rate: int) -> np.ndarray:
    """Write ``rate`` (steps per second for the whole guest, 0 = unlimited) into the parameter pages.

    A budget already granted is cut to one step so the new rate applies within one grant (a guest
    decrement racing this write can keep the old budget: at most 65536 steps at the old rate).
    Returns the pages written (int64 indices) for the dirty log.
    """
    per_vcpu = per_vcpu_rate(rate, smp)
    pages = np.arange(layout.params, layout.params + smp, dtype=np.int64)
    for page in pages.tolist():
        p = ram64[page]
        p[P_RATE // 8] = per_vcpu
        if int(p[P_BUDGET // 8]) > 1:
            p[P_BUDGET // 8] = 1
    return pages


def next_grant(rate: int, next_t: float | None, now: float) -> tuple[int, float | None, float]:
    """The budget to grant at ``now`` (monotonic seconds) to a vCPU paced at ``rate`` steps/s.

    ``next_t`` is when the previous grant's steps are due (None: no schedule yet). Returns (steps
    to grant, the new ``next_t``, seconds to sleep before granting). A schedule more than
    :data:`MAX_LAG` behind restarts at ``now`` instead of catching up in a burst.
    """
    if rate == 0:
        return UNLIMITED_GRANT, next_t, 0.0
    grant = max(1, rate // GRANTS_PER_SECOND)
    if next_t is None or now - next_t > MAX_LAG:
        next_t = now
    next_t += grant / rate
    return grant, next_t, next_t - now


def steps_done(ram64: np.ndarray, layout: Layout, smp: int) -> int:
    """Sum over vCPUs of ``n`` in their parameter pages."""
    return int(ram64[layout.params: layout.params + smp, P_N // 8].sum())


# --- the report port -------------------------------------------------------------------------------
class ReportPort:
    """The host side of ``PORT_REPORT`` for one vCPU: the last value reported, the reports seen by
    this process, and the first violation (a report that was not the previous one plus one)."""

    STATE = struct.Struct("<QQ")  # last report, reports seen

    def __init__(self, vcpu: int) -> None:
        self.vcpu = vcpu
        self.last = 0
        self.seen = 0
        self.violation: str | None = None

    def record(self, value: int) -> None:
        expected = (self.last + 1) & 0xFFFFFFFF
        if value != expected and self.violation is None:
            self.violation = (f"vCPU {self.vcpu}: counter reported {value} after {self.last} "
                              f"(expected {expected}: a gap or a repeat)")
        self.last = value
        self.seen += 1

    def save(self) -> bytes:
        """The port's migratable state (16 bytes: last report, reports seen)."""
        return self.STATE.pack(self.last, self.seen)

    def load(self, data: bytes) -> None:
        """Continue from a source's :meth:`save`: its last report; seen and violation start afresh."""
        self.last, _seen = self.STATE.unpack(data)
        self.seen = 0
        self.violation = None


# --- the reference check ---------------------------------------------------------------------------
def check_vcpu(ram64: np.ndarray, layout: Layout, config: GuestConfig, port: ReportPort,
               ensure: Callable[[np.ndarray], None] | None = None) -> None:
    """Check vCPU ``port.vcpu``'s program state in (paused) guest RAM; GuestError on the first mismatch.

    ``ensure(pages)``, when given, is called with the pages (int64) about to be read, before reading
    them (post-copy: :meth:`livemig.guest.base.RamBlock.ensure_pages`).

    ``counter``: the parameter page holds what the layout says; the values of the last (up to 4096)
    steps are where they belong and equal :func:`splitmix_values`; every report this process saw
    followed the previous one by exactly one; the last report matches ``n``.
    ``dirty``: the same for the parameters and the last steps, each value being its step number.
    """
    counter = config.workload == "counter"
    index = port.vcpu
    if ensure is not None:
        ensure(np.array([layout.params + index], dtype=np.int64))
    p = ram64[layout.params + index]
    first, count = layout.vcpu_pages(config.smp, index)
    want = {P_FIRST: first, P_NPAGES: count}
    shift = 0
    if counter:
        want[P_SEED] = vcpu_seed(config.seed, index)
        shift = int(p[P_SHIFT // 8])
        if shift > 40:
            raise GuestError(f"vCPU {index}: counter shift {shift} in guest RAM, expected <= 40")
        want[P_MASK] = (1 << shift) - 1
    for off, value in want.items():
        if int(p[off // 8]) != value:
            raise GuestError(f"vCPU {index}: parameter at {off:#x} is {int(p[off // 8])}, expected {value}")
    n = int(p[P_N // 8])
    k = min(n, count * 512, 4096)
    steps = np.arange(n - k, n, dtype=np.uint64)
    slots = (first + steps % np.uint64(count)) * np.uint64(512) + (steps // np.uint64(count)) % np.uint64(512)
    if ensure is not None:
        ensure((slots // np.uint64(512)).astype(np.int64))
    got = ram64.reshape(-1)[slots.astype(np.int64)]
    expect = splitmix_values(vcpu_seed(config.seed, index), steps) if counter else steps
    bad = np.flatnonzero(got != expect)
    if bad.size:
        m = int(steps[bad[0]])
        raise GuestError(f"vCPU {index}: step {m} of {n}: guest RAM holds {int(got[bad[0]]):#x}, "
                         f"reference {int(expect[bad[0]]):#x}")
    if counter:
        if port.violation is not None:
            raise GuestError(port.violation)
        top = (n >> shift) & 0xFFFFFFFF
        allowed = {top}
        if n and n & ((1 << shift) - 1) == 0:
            allowed.add((top - 1) & 0xFFFFFFFF)  # paused between the commit and its OUT
        if port.last not in allowed:
            raise GuestError(f"vCPU {index}: last report {port.last} does not match n = {n} "
                             f"(expected {sorted(allowed)})")
