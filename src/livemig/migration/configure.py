"""A destination's acceptance of a source's livemig/config (docs/wire.md, "Return path",
admission): protocol version, uuid, the parameters both sides share, and the guest (created from
the config when none was given). Raises MainRefusal with the reason; the gate answers it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from ..compress import create_method, method_names
from ..compress.auto import AUTO
from ..errors import MigrationError
from ..guest import GuestConfig, create_guest
from ..ram.digest import ChunkDigest
from ..units import format_size
from . import protocol
from .accept import MainRefusal

if TYPE_CHECKING:
    from .destination import Destination


def adopt_method(dst: Destination, name: Any) -> None:
    """``multifd-compression auto`` here: receive the method the source named (MainRefusal if
    it is unknown or cannot run here)."""
    if name not in method_names():
        raise MainRefusal(f"multifd-compression: the source's {name!r} is not a method "
                          f"(expected one of {', '.join(method_names())})")
    try:
        dst.method = dst._recv.method = create_method(name, 1, dst.page_size)
    except MigrationError as exc:
        raise MainRefusal(str(exc)) from exc


def apply_config(dst: Destination, data: bytes) -> None:
    """Accept the livemig/config blob ``data`` into ``dst`` (its guest, blocks, receive state), or
    raise MainRefusal naming what differs."""
    try:
        cfg = json.loads(data)
        gcfg = GuestConfig.from_json(json.dumps(cfg["guest"]))
        theirs = [(str(n), int(size)) for n, size in cfg.get("blocks", [])]
    except (ValueError, KeyError, TypeError, MigrationError) as exc:
        raise MainRefusal(f"livemig/config section is malformed: {exc}") from exc
    if cfg.get("protocol") != protocol.VERSION:
        raise MainRefusal(f"handover protocol version differs: source {cfg.get('protocol')!r}, destination "
                          f"{protocol.VERSION}; run the same livemig version on both sides")
    try:
        same = bytes.fromhex(str(cfg.get("uuid"))) == dst.uuid
    except ValueError:
        same = False
    if not same:
        raise MainRefusal("the uuid differs from the destination's")
    if dst.params.multifd_compression == AUTO:  # take the method the source's auto picked
        adopt_method(dst, cfg.get("multifd-compression"))
    mine = {
        "multifd-channels": dst.params.multifd_channels,
        "multifd-compression": dst.method.name,
        "page-size": dst.page_size,
        "postcopy-ram": dst.postcopy is not None,
    }
    cfg.setdefault("postcopy-ram", False)  # absent: off
    for key, value in mine.items():
        if cfg.get(key) != value:
            raise MainRefusal(f"{key} differs: source uses {_shown(cfg.get(key))}, destination {_shown(value)}; "
                              "set the same on both sides")
    if dst.guest is None:
        need = max(gcfg.memory, sum(size for _, size in theirs))
        if need > dst.max_memory:
            raise MainRefusal(f"the source's guest needs {format_size(need)} of RAM, more than this "
                              f"destination's --max-memory {format_size(dst.max_memory)}")
        dst.log(f"creating the {gcfg.kind} guest from the source's config ({format_size(gcfg.memory)})")
        try:
            dst.guest = create_guest(gcfg, incoming=True)
        except MigrationError as exc:
            raise MainRefusal(str(exc)) from exc
    else:
        ours = [(b.name, b.size) for b in dst.guest.blocks]
        if theirs != ours or gcfg.kind != dst.guest.config.kind:
            def show(blocks: list[tuple[str, int]]) -> str:
                return ", ".join(f"{name} {format_size(size)}" for name, size in blocks)
            raise MainRefusal(f"guest differs: source has a {gcfg.kind} guest with RAM {show(theirs)}, "
                              f"destination a {dst.guest.config.kind} guest with RAM {show(ours)}")
        dst.guest.config = gcfg
    dst._restart_timer()  # creating the guest may have taken a while
    for b in dst.guest.blocks:
        dst.blocks[b.name] = b
        dst.views[b.name] = b.view()
        dst.received[b.name] = np.zeros(b.npages, dtype=bool)
        dst.digests[b.name] = ChunkDigest(dst.views[b.name], dst.page_size)
        dst.digests[b.name].assume_zero()  # an incoming guest's RAM is zero (Guest contract)
    dst._guest_ready.set()


def _shown(value: Any) -> str:
    """A shared setting as QEMU's HMP shows it: capabilities on/off, names quoted, numbers bare."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value)
