"""Codec and socket speeds measured on this host, kept across processes for a while.

``multifd-compression auto`` needs every candidate's speed with all cores busy, and measuring them
costs 0.2-0.4 s of setup. Each measurement (:func:`livemig.accel.speed.measure`, and the all-cores
Unix-socket copy rate) is stored in one small JSON file and reused by later processes, so only the
first ``auto`` migration on a host pays for it; ``livemig advise`` stores what it measures too.

* **where**: ``$XDG_CACHE_HOME/livemig/speeds.json``, else ``~/.cache/livemig/speeds.json``;
  ``LIVEMIG_SPEED_CACHE=off`` neither reads nor writes it (every process measures).
* **key**: what a figure depends on: the CPU model and core count (``/proc/cpuinfo``), the versions
  of Python, numpy and the codec libraries (zstd, pyzstd, backports.zstd, isal), and for a codec
  its method, level, backend (which names the library or the hardware) and thread count. A
  different host, library or backend misses and is measured again.
* **age**: an entry older than :data:`MAX_AGE` seconds is measured again (speeds drift as the
  host's load and firmware change).

A codec's speed is measured on the sample at hand (the first guest's pages for ``auto``, the
corpus for ``advise``) and reused for later guests, whose ratio ``auto`` always measures on their own
pages. The file is small (a few entries per method and core count); a file that cannot be read or written
is ignored (measured again, nothing raised): the cache only saves time.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from .speed import Measurement

#: seconds an entry is used for: one day
MAX_AGE = 24 * 3600
#: bumped when what is measured, or how, changes (older files then miss)
FORMAT = 1
#: ``LIVEMIG_SPEED_CACHE`` value that turns the cache off
OFF = "off"


def path() -> Path:
    """The cache file: ``$XDG_CACHE_HOME/livemig/speeds.json`` or ``~/.cache/livemig/speeds.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "livemig" / "speeds.json"


def enabled() -> bool:
    return os.environ.get("LIVEMIG_SPEED_CACHE", "").lower() != OFF


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    from importlib import metadata

    from ..compress import libzstd

    out = [f"python {platform.python_version()}", f"zstd {libzstd.version() or '-'}"]
    for dist in ("numpy", "pyzstd", "backports.zstd", "isal"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


@lru_cache(maxsize=1)
def host_key() -> str:
    """What every figure here depends on: CPU model, cores and library versions (one line)."""
    return f"{_cpu_model()}; {os.cpu_count()} cores; {_versions()}; format {FORMAT}"


def _read() -> dict[str, Any]:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(key: str, now: float | None = None) -> tuple[Any, float] | None:
    """(value, age in seconds) of a fresh entry, or None."""
    if not enabled():
        return None
    entry = _read().get(f"{host_key()} | {key}")
    if not isinstance(entry, dict) or "value" not in entry:
        return None
    age = (time.time() if now is None else now) - float(entry.get("time", 0))
    if not 0 <= age <= MAX_AGE:
        return None
    return entry["value"], age


def _put(key: str, value: Any) -> None:
    """Store ``value`` under ``key`` (replacing the file atomically; stale entries are dropped)."""
    if not enabled():
        return
    file = path()
    now = time.time()
    data = {k: v for k, v in _read().items()
            if isinstance(v, dict) and 0 <= now - float(v.get("time", 0)) <= MAX_AGE}
    data[f"{host_key()} | {key}"] = {"time": now, "value": value}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".speeds-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, file)
    except OSError:
        pass


def _codec_key(name: str, level: int | None, backend: str, threads: int) -> str:
    return f"codec {name} level {level} threads {threads} backend {backend}"


def measurement(name: str, level: int | None, backend: str, threads: int) -> tuple[Measurement, float] | None:
    """(the cached Measurement of ``name`` at ``level`` on ``backend`` with ``threads`` threads,
    its age in seconds), or None when there is none younger than :data:`MAX_AGE`."""
    hit = _get(_codec_key(name, level, backend, threads))
    if hit is None:
        return None
    value, age = hit
    try:
        return Measurement(**{f.name: value[f.name] for f in fields(Measurement)}), age
    except (KeyError, TypeError):
        return None


def store_measurement(m: Measurement) -> None:
    """Keep ``m`` for later processes (keyed by its method, level, backend and threads)."""
    _put(_codec_key(m.method, m.level, m.backend, m.threads), asdict(m))


def socket_rate(connections: int) -> tuple[float, float] | None:
    """(cached all-cores Unix-socket copy rate of ``connections`` pairs, bytes/s; age s), or None."""
    hit = _get(f"unix sockets {connections}")
    if hit is None or not isinstance(hit[0], (int, float)):
        return None
    return float(hit[0]), hit[1]


def store_socket_rate(connections: int, bps: float) -> None:
    _put(f"unix sockets {connections}", bps)
