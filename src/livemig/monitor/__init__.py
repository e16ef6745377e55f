"""livemig's monitors, as QEMU's: QMP (JSON, :mod:`.server`) and HMP (text, :mod:`.hmp`).

The command layer (:mod:`.dispatch`, :mod:`.schema`) knows no transport; the VM's commands are
registered by :mod:`livemig.vm.commands`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from .dispatch import Call, Command, CommandTable, Session, event
from .schema import QMPError

__all__ = ["Call", "Command", "CommandTable", "QMPError", "Session", "event", "version_info"]


def version_info() -> dict[str, Any]:
    """``query-version``'s answer (and the greeting's ``version``): livemig's own version numbers."""
    try:
        text = metadata.version("livemig")
    except metadata.PackageNotFoundError:
        text = "0.0.0"
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]] + [0, 0, 0]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]}, "package": f"livemig-{text}"}
