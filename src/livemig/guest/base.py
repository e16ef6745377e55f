"""The guest interface: what the migration engine needs from a virtual machine, and nothing more.

A guest has RAM blocks (memfd-backed, shareable with other processes), a dirty log, vCPUs that can
be paused and resumed, and a CPU-side state that can be saved on the source and loaded on the
destination. Two kinds implement it: :mod:`livemig.guest.portable` (runs anywhere: vCPU workers are
host threads that mark what they write) and :mod:`livemig.guest.kvm` (a real KVM virtual machine,
KVM's own dirty log).

Life cycle on the source: ``create_guest(config)`` (RAM filled, vCPUs not running) -> ``start()``
-> ``start_dirty_log()`` -> ``sync_dirty_log()``... -> ``pause()`` -> ``save_state()`` -> (on
failure) ``resume()``. On the destination: ``create_guest(config, incoming=True)`` (RAM zeroed and
prefaulted, nothing running) -> RAM written by the receiver -> ``load_state(blob)`` -> ``resume()``.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import GuestError
from ..ram.pages import unique_pages
from ..wire.constants import PAGE_SIZE as PAGE_SIZE
from .throttle import CpuThrottle


@dataclass
class GuestConfig:
    """Everything needed to create the same guest on the other side (sent in the main stream)."""

    #: "portable" or "kvm"
    kind: str = "portable"
    #: bytes of guest RAM
    memory: int = 256 << 20
    #: number of vCPUs
    smp: int = 1
    #: "idle", "dirty" or "counter"
    workload: str = "idle"
    #: dirty workload: pages written per second (0 = as fast as it can)
    dirty_rate: int = 20000
    #: dirty/counter workload: pages in the working set (0 = all of RAM but the guest's own pages)
    working_set: int = 0
    #: RAM fill at start: "zero", "random", "corpus", "files:DIR" or "image:PATH"
    fill: str = "zero"
    #: seed of every generated pattern (fill, workload)
    seed: int = 0

    def check(self) -> None:
        """Refuse, before anything is allocated, a config that its guest kind would refuse when created.

        Calls the kind's own checks (``livemig.guest.portable`` and, for KVM, the vCPU and memory-layout
        checks of ``livemig.guest.kvm``: at least 2 MiB, at most 256 GiB, 1..64 vCPUs) and the fill's
        (:func:`livemig.guest.fill.describe_fill`; ``files:DIR`` listed, ``image:PATH`` opened, not read).
        Raises GuestError whose ``field`` attribute names the GuestConfig field at fault ("memory",
        "smp", "fill", ...; "" when it cannot tell). What depends on the host (KVM's own vCPU limit,
        free memory) is only found when the guest is created.
        """
        try:
            self._check()
        except GuestError as exc:
            found = [(m.start(), f.name) for f in dataclasses.fields(self)
                     if (m := re.search(rf"\b{f.name}\b", str(exc)))]
            exc.field = min(found)[1] if found else ""  # type: ignore[attr-defined]
            raise

    def _check(self) -> None:
        from . import fill, portable  # local imports: both import this module

        if self.memory <= 0 or self.memory % PAGE_SIZE:
            raise GuestError(f"memory {self.memory}: expected a positive multiple of {PAGE_SIZE} bytes")
        if self.kind == "kvm":
            from .kvm import guest as kvm_guest
            from .kvm import longmode

            kvm_guest._check_config(self)
            longmode.Layout.of(self)
        elif self.kind == "portable":
            portable._check_config(self)
        else:
            raise GuestError(f"kind '{self.kind}': expected portable or kvm")
        fill.describe_fill(self.fill)
        kind, _, arg = self.fill.partition(":")
        if kind == "files":
            fill.fill_files(np.empty((0, PAGE_SIZE), dtype=np.uint8), arg)  # lists the directory, reads nothing
        elif kind == "image":
            try:
                size = os.stat(arg).st_size
            except OSError as exc:
                raise GuestError(f"fill image:{arg}: cannot open: {exc.strerror}") from exc
            if size > self.memory:
                raise GuestError(f"fill image:{arg}: image is {size} bytes, "
                                 f"larger than guest RAM ({self.memory} bytes)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> GuestConfig:
        try:
            raw = json.loads(text)
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = set(raw) - names
            if unknown:
                raise GuestError(f"guest config has unknown fields {sorted(unknown)}")
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise GuestError(f"guest config is not valid JSON of GuestConfig: {exc}") from exc


class RamBlock:
    """One RAM block: a named, page-aligned, memfd-backed mapping.

    ``buf`` is the writable mapping; ``pages`` a zero-copy numpy view of shape (npages, page_size).
    """

    def __init__(self, name: str, size: int, page_size: int = PAGE_SIZE) -> None:
        if size <= 0 or size % page_size:
            raise GuestError(f"RAM block '{name}': size {size} is not a positive multiple of {page_size}")
        self.name = name
        self.size = size
        self.page_size = page_size
        self.fd = os.memfd_create(f"livemig-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.buf = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise GuestError(f"RAM block '{name}': cannot allocate {size} bytes: {exc}") from exc
        self.pages: np.ndarray = np.frombuffer(self.buf, dtype=np.uint8).reshape(-1, page_size)
        #: post-copy destination: one bool per page, False while the page is missing (registered with a
        #: userfaultfd and not placed yet); only ever goes False -> True while post-copy runs. None (the
        #: normal case) = every page present. Set by the migration engine; read by :meth:`ensure_pages`.
        self.present: np.ndarray | None = None

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def prefault(self) -> None:
        """Populate every page now (as QEMU's ``-mem-prealloc``), so first touches are not timed."""
        advice = getattr(mmap, "MADV_POPULATE_WRITE", 23)
        try:
            self.buf.madvise(advice)
        except OSError:
            # older kernels: touch one byte per page, vectorised
            self.pages[:, 0] = self.pages[:, 0]

    def view(self) -> memoryview:
        return memoryview(self.buf)

    @property
    def address(self) -> int:
        """The mapping's virtual address in this process (for userfaultfd and KVM memory slots)."""
        return int(self.pages.__array_interface__["data"][0])

    def discard(self, first_page: int, npages: int) -> None:
        """Free pages ``[first_page, first_page + npages)``: they read as zero, or fault when the block
        is registered with a userfaultfd (post-copy, :mod:`livemig.guest.uffd`). Raises GuestError."""
        from .uffd import punch_hole  # local: ctypes setup only where post-copy is used

        punch_hole(self.fd, first_page * self.page_size, npages * self.page_size)

    # --- post-copy: the GIL rule (docs/postcopy.md, "Guests and the GIL") ----------------------------
    def ensure_pages(self, idx: np.ndarray) -> None:
        """Make the pages ``idx`` (int page indices, any shape) present before Python reads or writes
        them: each page not known present is touched with the GIL released
        (:func:`livemig.guest.uffd.touch`), so a missing one is faulted in (this thread waits until
        it is placed) while the thread placing pages keeps running. A no-op when :attr:`present` is
        None; otherwise costs one vectorised lookup plus one C call per page not known present.

        Never call it from the thread that places the pages: it would wait for itself.
        """
        present = self.present  # read once: the engine may set it to None at any time
        if present is None:
            return
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        missing = idx[~present[idx]]
        if missing.size:
            self._touch(unique_pages(missing))

    def ensure_range(self, first_page: int, npages: int) -> None:
        """:meth:`ensure_pages` for the pages ``[first_page, first_page + npages)``."""
        present = self.present
        if present is None:
            return
        missing = np.flatnonzero(~present[first_page:first_page + npages])
        if missing.size:
            self._touch(missing + first_page)

    def ensure_bytes(self, offset: int, length: int) -> None:
        """:meth:`ensure_pages` for every page holding a byte of ``[offset, offset + length)``."""
        if self.present is None or length <= 0:
            return
        first = offset // self.page_size
        self.ensure_range(first, (offset + length - 1) // self.page_size - first + 1)

    def pages_present(self, idx: np.ndarray) -> bool:
        """True when every page of ``idx`` is known present (reading them cannot fault); never waits."""
        present = self.present
        return present is None or bool(present[np.asarray(idx, dtype=np.int64)].all())

    def _touch(self, pages: np.ndarray) -> None:
        """Touch the sorted unique ``pages`` with the GIL released, one call per run of adjacent pages."""
        from .uffd import touch  # local: ctypes setup only where post-copy is used

        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [pages.size]))
        base, ps = self.address, self.page_size
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            touch(base + int(pages[s]) * ps, (e - s) * ps, ps)

    def close(self) -> None:
        self.pages = np.empty((0, self.page_size), dtype=np.uint8)
        try:
            self.buf.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        os.close(self.fd)


class Guest(ABC):
    """A virtual machine as the migration engine sees it."""

    #: "portable" or "kvm"
    kind: ClassVar[str]

    def __init__(self, config: GuestConfig) -> None:
        self.config = config
        self.page_size = PAGE_SIZE
        self.blocks: list[RamBlock] = []
        #: the vCPU throttle auto-converge sets (:mod:`livemig.guest.throttle`); the kinds hold their vCPUs
        self.throttle = CpuThrottle(max(1, int(config.smp)))

    # --- RAM -------------------------------------------------------------------------------------
    def block(self, name: str) -> RamBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise GuestError(f"no RAM block named '{name}'")

    @property
    def ram_size(self) -> int:
        return sum(b.size for b in self.blocks)

    # --- vCPUs -----------------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Start the vCPUs running the workload (source, after creation)."""

    @abstractmethod
    def pause(self) -> None:
        """Stop every vCPU; returns when none runs and every write so far is in RAM and the log."""

    @abstractmethod
    def resume(self) -> None:
        """Let the vCPUs run again (after pause, or after load_state on the destination)."""

    @property
    @abstractmethod
    def running(self) -> bool:
        """True while the vCPUs run."""

    # --- dirty log -------------------------------------------------------------------------------
    @abstractmethod
    def start_dirty_log(self) -> None:
        """Start tracking writes; the first sync reports pages written since this call."""

    @abstractmethod
    def sync_dirty_log(self) -> dict[str, np.ndarray]:
        """Block name -> sorted int64 array of page indices written since the last sync; clears them."""

    @abstractmethod
    def stop_dirty_log(self) -> None:
        """Stop tracking writes."""

    def mark_dirty(self, block: str, pages: np.ndarray) -> None:  # noqa: B027 - optional hook
        """Record host-side writes into guest RAM (KVM does not see them). Default: nothing to do."""

    # --- CPU-side state --------------------------------------------------------------------------
    @abstractmethod
    def save_state(self) -> bytes:
        """Everything besides RAM that the guest needs to continue (paused guests only)."""

    @abstractmethod
    def load_state(self, blob: bytes) -> None:
        """Restore what save_state produced; raises GuestError on a malformed blob."""

    # --- workload --------------------------------------------------------------------------------
    def progress(self) -> int:
        """A monotonic measure of the workload's progress (the counter's value; 0 if none)."""
        return 0

    def check_workload(self) -> None:  # noqa: B027 - optional hook
        """Raise GuestError if the workload's state in RAM is not what its reference says (default: no check)."""

    def describe(self) -> dict[str, Any]:
        """A few facts for statistics and logs."""
        return {"kind": self.kind, "memory": self.ram_size, "smp": self.config.smp,
                "workload": self.config.workload, "fill": self.config.fill}

    @abstractmethod
    def close(self) -> None:
        """Stop everything and release RAM and fds."""
