"""Loading a mapped-ram file (``livemig incoming file:PATH``; QEMU's format, docs/mapped-ram.md).

The file says what it is (:func:`livemig.wire.mapped_ram.parse`): a *livemig snapshot* (machine
type ``livemig-1`` with a livemig/config section) restores its guest: RAM read in, checked against
the snapshot's digests, CPU state loaded, guest resumed where it stopped. Any other file (QEMU's
own, or one livemig wrote for QEMU) has only RAM livemig can use: its blocks are read into memory
(``--dump-ram DIR`` writes them out, one file per block) and QEMU's CPU and device sections are
named and not applied: livemig's guest cannot run QEMU's machine, so no guest is resumed.

Pages are read by ``multifd-channels`` threads with ``os.preadv`` straight into RAM, only those
whose bitmap bit is set (the others stay zero); every region is checked against the file's size
before a byte is read.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import GuestError, IntegrityError, MigrationError, WireError, os_reason
from ..guest import Guest, GuestConfig, create_guest
from ..params import MigrationParameters
from ..ram.digest import ChunkDigest
from ..ram.pages import bitmap_to_pages, chunks, runs
from ..units import format_size
from ..wire import mapped_ram, packet
from ..wire.constants import PAGE_SIZE
from .destination import Destination
from .mapped_file import PagePool
from .protocol import MACHINE_TYPE
from .stats import ChannelCounters, host_memory_limit


def dump_name(block: str) -> str:
    """The file ``--dump-ram`` writes a RAM block to: ``dst-<id>.bin``, a ``/`` in QEMU's block ids
    (``/rom@etc/acpi/tables``) made ``_`` after the leading one is dropped."""
    return f"dst-{block.strip('/').replace('/', '_')}.bin"


class FileLoad:
    """Loads the mapped-ram file ``path``; :meth:`run` returns the result dict (``status``,
    ``kind``: ``livemig`` or ``qemu``, ``machine-type``, ``blocks``, ``pages``, ``resumed`` ...) or
    raises MigrationError naming what is wrong with the file (WireError), the RAM (IntegrityError)
    or the guest (GuestError). ``guest_config``, when given (``--memory``), must be the snapshot's;
    ``guest``, when given (an incoming guest created ahead, as ``livemig vm --incoming`` has), is the
    one restored instead of a new one, and its kind, RAM and vCPUs must be the snapshot's (it is
    not closed by :meth:`close`).
    """

    def __init__(self, path: str, params: MigrationParameters, *, guest: Guest | None = None,
                 guest_config: GuestConfig | None = None,
                 run_after: float = 0.0, dump_ram: str | None = None, max_memory: int | None = None,
                 log: Callable[[str], None] | None = None, resume: bool = True) -> None:
        params.check()
        self.path, self.params = path, params
        self.guest_config = guest_config
        self.run_after = run_after
        self.dump_ram = dump_ram
        self.max_memory = host_memory_limit() if max_memory is None else max_memory
        self.log = log or (lambda _m: None)
        #: resume the restored guest (False: loaded and left paused, for ``livemig vm -S``)
        self.resume = resume
        self.page_size = PAGE_SIZE
        self.guest: Guest | None = guest
        self._own_guest = guest is None
        if guest is not None and guest_config is None:
            self.guest_config = guest.config
        self._buffers: list[mmap.mmap] = []

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MigrationError(f"cannot open {self.path}: {os_reason(exc)}") from exc
        try:
            size = os.fstat(fd).st_size
            info = mapped_ram.parse(lambda at, n: os.pread(fd, n, at), size, self.page_size)
            snapshot = "livemig/config" in info.livemig
            if info.machine_type == MACHINE_TYPE and not snapshot:
                raise WireError("mapped-ram file of machine livemig-1 without its livemig/config section")
            views = self._guest_views(info) if snapshot else self._buffer_views(info)
            counters = self._read_pages(fd, info, views)
        except OSError as exc:
            raise MigrationError(f"cannot read {self.path}: {os_reason(exc)}") from exc
        finally:
            os.close(fd)
        result: dict[str, Any] = {
            "status": "completed", "kind": "livemig" if snapshot else "qemu", "machine-type": info.machine_type,
            "blocks": [[b.name, b.length] for b in info.blocks],
            "pages": sum(c.normal for c in counters), "bytes-read": sum(c.wire_bytes for c in counters),
            "read-ms": round((time.monotonic() - t0) * 1000), "resumed": False,
        }
        if self.dump_ram:
            self._dump(self.dump_ram, views)
        if snapshot:
            result.update(self._restore(info, views))
        else:
            result["devices-not-applied"] = info.devices
        return result

    def close(self) -> None:
        if self.guest is not None and self._own_guest:
            self.guest.close()
            self.guest = None
        for buf in self._buffers:
            buf.close()
        self._buffers.clear()

    # --- where RAM goes ----------------------------------------------------------------------------
    def _guest_views(self, info: mapped_ram.FileInfo) -> dict[str, memoryview]:
        """Create the snapshot's guest (RAM zero, nothing running) and return its blocks."""
        try:
            cfg = json.loads(info.livemig["livemig/config"])
            gcfg = GuestConfig.from_json(json.dumps(cfg["guest"]))
        except (ValueError, KeyError, TypeError, MigrationError) as exc:
            raise WireError(f"mapped-ram file: livemig/config section is malformed: {exc}") from exc
        mine = self.guest_config
        if mine is not None and (mine.kind, mine.memory, mine.smp) != (gcfg.kind, gcfg.memory, gcfg.smp):
            raise MigrationError(f"the snapshot holds a {gcfg.kind} guest of {format_size(gcfg.memory)} and "
                                 f"{gcfg.smp} vCPU(s), not the {mine.kind} guest of {format_size(mine.memory)} and "
                                 f"{mine.smp} vCPU(s) the options ask for (the guest comes from the file)")
        if self.guest is None and gcfg.memory > self.max_memory:
            raise MigrationError(f"the snapshot's guest needs {format_size(gcfg.memory)} of RAM, more than "
                                 f"--max-memory {format_size(self.max_memory)}")
        if self.guest is None:
            self.log(f"creating the {gcfg.kind} guest of the snapshot ({format_size(gcfg.memory)})")
            self.guest = create_guest(gcfg, incoming=True)
        else:
            self.guest.config = gcfg  # its workload and fill are the snapshot's, as on a socket
        ours = [(b.name, b.size) for b in self.guest.blocks]
        theirs = [(b.name, b.length) for b in info.blocks]
        if ours != theirs:
            raise WireError("mapped-ram file: RAM blocks", theirs, f"the guest's own {ours}")
        return {b.name: b.view() for b in self.guest.blocks}

    def _buffer_views(self, info: mapped_ram.FileInfo) -> dict[str, memoryview]:
        """Zero memory for each block of a QEMU file (anonymous mappings: untouched pages cost nothing)."""
        total = sum(b.length for b in info.blocks)
        if total > self.max_memory:
            raise MigrationError(f"the file's RAM blocks need {format_size(total)}, more than --max-memory "
                                 f"{format_size(self.max_memory)}")
        views: dict[str, memoryview] = {}
        for b in info.blocks:
            buf = mmap.mmap(-1, b.length)
            self._buffers.append(buf)
            views[b.name] = memoryview(buf)
        return views

    # --- pages -------------------------------------------------------------------------------------
    def _read_pages(self, fd: int, info: mapped_ram.FileInfo, views: dict[str, memoryview]) -> list[ChannelCounters]:
        pool = PagePool(self.params.multifd_channels, "multifd-file", lambda: None)
        try:
            for lay in info.blocks:
                words = np.frombuffer(os.pread(fd, lay.bitmap_size, lay.bitmap_offset), dtype=np.uint64)
                pages = bitmap_to_pages(words, lay.npages)
                for piece in chunks(pages, packet.page_count(self.page_size)):
                    pool.submit(self._job, fd, lay, views[lay.name], piece)
            pool.wait()
        finally:
            pool.close()
        return pool.counters

    def _job(self, counters: ChannelCounters, fd: int, lay: mapped_ram.BlockLayout, view: memoryview,
             idx: np.ndarray) -> None:
        ps = self.page_size
        for first, count in runs(idx):
            dest = view[first * ps : (first + count) * ps]
            at = lay.pages_offset + first * ps
            while dest.nbytes:
                n = os.preadv(fd, [dest], at)
                if n == 0:
                    raise WireError(f"mapped-ram file: page {first} of block {lay.name!r} at offset {at:#x}",
                                    "end of file", f"{dest.nbytes} more bytes (the file shrank while read?)")
                dest, at = dest[n:], at + n
            counters.wire_bytes += count * ps
        counters.normal += int(idx.size)
        counters.packets += 1

    # --- a livemig snapshot's guest ------------------------------------------------------------------
    def _restore(self, info: mapped_ram.FileInfo, views: dict[str, memoryview]) -> dict[str, Any]:
        guest = self.guest
        assert guest is not None
        state = info.livemig.get("livemig/vcpu")
        digest = info.livemig.get("livemig/digest")
        if state is None or digest is None:
            missing = [s for s, v in (("livemig/vcpu", state), ("livemig/digest", digest)) if v is None]
            raise WireError(f"mapped-ram file: a livemig snapshot without {' and '.join(missing)} (incomplete)")
        expected = Destination._source_digests(digest)
        for name, view in views.items():
            mine = ChunkDigest(view, self.page_size).digest(full=True)
            if expected.get(name) != mine:
                raise IntegrityError(f"RAM block '{name}' differs from the snapshot's digest (file "
                                     f"{expected.get(name)}, read {mine}): the file is damaged; guest not started")
        try:
            guest.load_state(state)
        except GuestError as exc:
            raise GuestError(f"the snapshot's guest state does not load: {exc}") from exc
        if not self.resume:
            return {"resumed": False}
        guest.resume()
        out: dict[str, Any] = {"resumed": True, "progress_at_resume": guest.progress()}
        if self.run_after:
            time.sleep(self.run_after)
            out["progress_after"] = guest.progress()
            try:
                guest.check_workload()
                out["workload_check"] = "ok"
            except MigrationError as exc:
                out["workload_check"] = str(exc)
        return out

    def _dump(self, directory: str, views: dict[str, memoryview]) -> None:
        os.makedirs(directory, exist_ok=True)
        for name, view in views.items():
            with open(os.path.join(directory, dump_name(name)), "wb") as f:
                f.write(view)
