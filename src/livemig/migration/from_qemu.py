"""Receiving a QEMU source's migration: its RAM lands here, its CPU and devices do not.

The destination's gate recognises a QEMU source by its CONFIGURATION (a machine type that is not
livemig's) and hands the main channel to :class:`QemuIncoming` (docs/qemu.md, "QEMU as the
source"):

* RAM blocks come from the RAM section's MEM_SIZE record (there is no livemig/config): one
  anonymous block per entry, bounded by the destination's ``max_memory``;
* multifd sync points: QEMU 8.0+ machine types write MULTIFD_FLUSH (and an EOS that does not
  sync); QEMU 7.2 (and machine types <= 7.2) sync at every RAM section's EOS. The stream says which:
  a MULTIFD_FLUSH before the setup section's EOS means per-round flushes, none means every EOS;
* pages on the main channel (7.2's zero pages, PAGE records) are applied as they come; empty
  packets whose next_packet_size is stale are ignored, as QEMU does;
* the device sections after RAM are read whole up to the VMDESCRIPTION JSON, which names them:
  they are reported as received and not applied;
* with the ``return-path`` capability QEMU sends OPEN_RETURN_PATH and PING: PING is answered with
  PONG, and the end with SHUT (0 once everything was read, 1 on a failure), which QEMU's source
  waits for before it completes.

No guest resumes: livemig's guest cannot run QEMU's CPU and device state. The result says so
(``resumed`` false, ``guest`` "not-run") and ``--dump-ram DIR`` writes one file per RAM block.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ..errors import MigrationError, TransportError, WireError
from ..guest.base import RamBlock
from ..ram.digest import ChunkDigest
from ..units import format_size
from ..wire import qemu, stream
from ..wire.constants import MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING
from .accept import MainRefusal

if TYPE_CHECKING:
    from .destination import Destination

#: why no guest resumes after a QEMU source's migration (said in the output and the result)
NOT_RUN_WHY: Final = "livemig cannot run QEMU's CPU and device state"
NOT_RUN: Final = f"RAM only: {NOT_RUN_WHY}, so no guest was started; the device sections were received and not applied"
SYNC_EOS: Final = "EOS (every RAM section, QEMU 7.2 and machine types <= 7.2)"
SYNC_FLUSH: Final = "MULTIFD_FLUSH (per round, QEMU 8.0+ machine types)"
#: the only target page size on x86 (configuration/target-page-bits is not sent for it)
TARGET_PAGE_BITS: Final = 12
REFUSED_CAPABILITIES: Final = {"x-ignore-shared": "RAM is then not sent at all", "mapped-ram": "a file format"}


def block_file(name: str) -> str:
    """The ``--dump-ram`` file name of RAM block ``name``: the name %-escaped (``/`` included),
    then ``.bin`` (``ram0.bin``, ``%2From%40etc%2Facpi%2Ftables.bin``)."""
    return urllib.parse.quote(name, safe="") + ".bin"


def admit_qemu(dst: Destination, machine_type: str) -> None:
    """The gate's ``on_qemu``: a QEMU source's main channel, on its greeter thread. It brings its own
    RAM blocks, so a destination started with a guest of its own refuses it (MainRefusal)."""
    if dst.guest is not None:
        raise MainRefusal(f"a QEMU source (machine type '{machine_type}') brings its own RAM blocks: start "
                          "livemig incoming without --memory to receive it")
    dst._recv.stale_empty_size = True
    dst.log(f"a QEMU source (machine type '{machine_type}'): receiving its RAM; its CPU and devices cannot run here")


class QemuIncoming:
    """Receives one QEMU source's stream on ``dst``'s main channel (already admitted with
    ``machine_type``; ``reader`` holds what followed its CONFIGURATION). :meth:`run` returns the
    result dict or raises (MigrationError and its kinds)."""

    def __init__(self, dst: Destination, reader: stream.StreamReader, machine_type: str) -> None:
        self.dst = dst
        self.reader = reader
        self.machine_type = machine_type
        self.return_path = False
        self.capabilities: list[str] = []
        #: None until the setup section's EOS tells (see the module doc)
        self.eos_syncs: bool | None = None
        self.flush_seen = False
        self.switchover_start = False
        self.main_pages = {"zero": 0, "normal": 0}
        self.devices: stream.DeviceSections | None = None
        self._rp_lock = threading.Lock()

    # --- the return path -------------------------------------------------------------------------
    def _rp_send(self, data: bytes) -> None:
        assert self.dst.main is not None
        with self._rp_lock:
            try:
                self.dst.main.sendall(data)
            except OSError as exc:
                raise TransportError(f"return path to the QEMU source failed: {exc.strerror or exc}") from exc

    def _shut(self, failed: bool) -> None:
        if self.return_path:
            with contextlib.suppress(MigrationError):
                self._rp_send(qemu.rp_shut(failed))

    # --- run -------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        dst = self.dst
        dst._restart_timer()
        threading.Thread(target=dst._watchdog, name="watchdog", daemon=True).start()
        try:
            try:
                self._receive()
            except BaseException:
                self._shut(failed=True)
                raise
            finally:
                dst._stream_done = True
            self._shut(failed=False)
            if dst.dump_ram:
                self._dump(dst.dump_ram)
            return self._result()
        finally:
            self._release()

    def _release(self) -> None:
        """Drop the RAM blocks (a channel thread still holding a view keeps its mapping alive)."""
        dst = self.dst
        blocks = list(dst.blocks.values())
        for table in (dst.views, dst.digests, dst.received, dst.blocks):
            table.clear()
        for b in blocks:
            b.close()

    def _receive(self) -> None:
        dst = self.dst
        while True:
            ev = dst.next_event(self.reader, closed_ok=True)
            if isinstance(ev, stream.ConfigSubsection):
                self._config_subsection(ev)
            elif isinstance(ev, stream.Command):
                if ev.cmd == MIG_CMD_OPEN_RETURN_PATH:
                    self.return_path = True
                elif ev.cmd == MIG_CMD_PING and self.return_path:
                    self._rp_send(qemu.rp_pong(int.from_bytes(ev.data, "big")))
            elif isinstance(ev, stream.SwitchoverStart):
                self.switchover_start = True
            elif isinstance(ev, stream.MemSize):
                self._create_blocks(ev.blocks)
            elif isinstance(ev, stream.MultifdFlush):
                self.flush_seen = True
                self._sync()
            elif isinstance(ev, stream.Eos):
                if self.eos_syncs is None:
                    self.eos_syncs = not self.flush_seen
                if self.eos_syncs:
                    self._sync()
            elif isinstance(ev, stream.ZeroPage | stream.Page):
                dst.apply_page(ev)
                self.main_pages["zero" if isinstance(ev, stream.ZeroPage) else "normal"] += 1
            elif isinstance(ev, stream.DeviceSections):
                self.devices = ev
                break
            elif isinstance(ev, stream.VmDescription | stream.Closed):
                break  # RAM's end came straight before EOF: no device sections
            elif isinstance(ev, stream.Blob):
                raise WireError(f"a livemig section ({ev.idstr}) in a QEMU source's stream")
        if not dst.blocks:
            raise WireError("QEMU stream without a RAM section", "EOF", "a RAM section with MEM_SIZE")
        if self.eos_syncs is None:
            raise WireError("QEMU stream: RAM section never ended (no EOS)")

    def _sync(self) -> None:
        try:
            self.dst.meet_channels()
        except TransportError as exc:
            if len(self.dst.channels) < self.dst.params.multifd_channels:
                raise TransportError(f"{exc}: the QEMU source needs the multifd capability on and "
                                     "multifd-channels equal to --multifd-channels") from exc
            raise

    def _config_subsection(self, ev: stream.ConfigSubsection) -> None:
        if ev.name == "configuration/capabilities":
            assert isinstance(ev.value, list)
            self.capabilities = ev.value
            for cap in ev.value:
                if cap in REFUSED_CAPABILITIES:
                    raise WireError("QEMU source capability", cap, "none of " + ", ".join(REFUSED_CAPABILITIES),
                                    note=f"not supported: {REFUSED_CAPABILITIES[cap]}")
        elif ev.name == "configuration/target-page-bits" and ev.value != TARGET_PAGE_BITS:
            raise WireError("QEMU source TARGET_PAGE_BITS", ev.value, TARGET_PAGE_BITS)

    def _create_blocks(self, blocks: list[tuple[str, int]]) -> None:
        """One RAM block per MEM_SIZE entry; the multifd channels may start once they exist."""
        dst = self.dst
        ps = dst.page_size
        total = sum(size for _, size in blocks)
        if total > dst.max_memory:
            raise MigrationError(f"the QEMU source's RAM blocks need {format_size(total)}, more than this "
                                 f"destination's --max-memory {format_size(dst.max_memory)}")
        for name, size in blocks:
            if size % ps or not size:
                raise WireError(f"RAM: MEM_SIZE length of block {name!r}", size, f"a positive multiple of {ps}")
        dst.log("QEMU's RAM blocks: " + ", ".join(f"{n} {format_size(s)}" for n, s in blocks))
        for name, size in blocks:
            block = RamBlock(name, size, ps)
            dst.blocks[name] = block
            dst.views[name] = block.view()
            dst.received[name] = np.zeros(block.npages, dtype=bool)
            dst.digests[name] = ChunkDigest(dst.views[name], ps)  # marked by the channels, never hashed
        dst._restart_timer()
        dst._guest_ready.set()

    def _dump(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        for name, view in self.dst.views.items():
            with open(os.path.join(directory, block_file(name)), "wb") as f:
                f.write(view)

    def _devices(self) -> list[dict[str, Any]]:
        if self.devices is None:
            return []
        return [{"name": d.idstr, "instance-id": d.instance_id, "version-id": d.version_id,
                 "section-id": d.section_id, "bytes": d.size} for d in self.devices.sections]

    def _result(self) -> dict[str, Any]:
        dst = self.dst
        chans = list(dst.channels.values())
        received = {name: int(r.sum()) for name, r in dst.received.items()}
        return {
            "status": "completed",
            "source": "qemu",
            "resumed": False,
            "guest": "not-run",
            "handover": "none",
            "note": NOT_RUN,
            "qemu": {
                "machine-type": self.machine_type,
                "capabilities": self.capabilities,
                "return-path": self.return_path,
                "multifd-sync": SYNC_EOS if self.eos_syncs else SYNC_FLUSH,
                "switchover-start": self.switchover_start,
                "ram-blocks": [{"name": n, "size": b.size, "pages-received": received[n]}
                               for n, b in dst.blocks.items()],
                "multifd-packets": sum(c.counters.packets for c in chans),
                "multifd-normal-pages": sum(c.counters.normal for c in chans),
                "multifd-zero-pages": sum(c.counters.zero for c in chans),
                "multifd-bytes": sum(c.counters.wire_bytes for c in chans),
                "main-zero-pages": self.main_pages["zero"],
                "main-normal-pages": self.main_pages["normal"],
                "vmdescription": self.devices is not None and self.devices.description is not None,
                "device-bytes": self.devices.size if self.devices else 0,
                "devices-not-applied": self._devices(),
            },
            "dump-ram": dst.dump_ram,
            "recv-cpu-percent": round(dst.meter.cpu_percent(), 1),
            "recv-mem-bytes": dst.meter.mem_bytes(),
            "recv-wall-ms": round((time.monotonic() - dst._t_first) * 1000),
            "recv-codec-cpu-s": round(sum(c.counters.codec_seconds for c in chans), 3),
        }


def summary(result: dict[str, Any]) -> str:
    """``livemig incoming``'s lines for a QEMU source's completed migration."""
    q = result["qemu"]
    blocks = q["ram-blocks"]
    total = sum(b["size"] for b in blocks)
    devices = q["devices-not-applied"]
    named = ", ".join(d["name"] for d in devices)
    if devices:
        dev = f"{len(devices)} device sections received, not applied ({q['device-bytes']} bytes): {named}"
    elif q["device-bytes"]:
        dev = f"{q['device-bytes']} bytes of device sections received, not applied (no VMDESCRIPTION names them)"
    else:
        dev = "no device sections"
    lines = [
        f"received RAM from a QEMU source ({q['machine-type']}): {len(blocks)} blocks, {format_size(total)}, "
        f"{q['multifd-packets']} multifd packets ({q['multifd-bytes']} bytes), multifd sync at {q['multifd-sync']}"
        f"{', return path' if q['return-path'] else ''}",
        dev,
        f"guest NOT started: {NOT_RUN_WHY} (RAM only)",
    ]
    if result.get("dump-ram"):
        lines.append(f"RAM blocks written to {result['dump-ram']} (one file per block: "
                     + ", ".join(block_file(b["name"]) for b in blocks) + ")")
    return "\n".join(lines)

