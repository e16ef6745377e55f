"""Everything one ``livemig bench`` invocation measured (:class:`Bench`), and its JSON. Pure.

The table (:mod:`.render`), the plots (:mod:`.plots`) and ``--json`` all read a Bench; the command
(:mod:`.cli`) fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..compress.auto import AUTO
from .config import BenchConfig
from .limits import CodecSpeed, LoopbackSpeed, compute_limit
from .model import Row, Run, aggregate, label_parts


def picked(run: Run) -> str | None:
    """What an ``auto`` run picked, as ``zstd-1`` (``none``), from its result's ``livemig.auto``."""
    auto = ((run.result or {}).get("livemig") or {}).get("auto") or {}
    if not isinstance(auto, dict) or not isinstance(auto.get("method"), str):
        return None
    return auto["method"] if auto.get("level") is None else f"{auto['method']}-{auto['level']}"


@dataclass(frozen=True)
class DataSample:
    """The data sample the codec speeds were measured on (the first pages of the guest's RAM)."""

    #: bytes
    size: int
    #: share of all-zero pages, 0..1
    zero_fraction: float
    #: zstd level 1 ratio, each 512 KiB compressed on its own
    zstd1_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {"sample-bytes": self.size, "zero-fraction": self.zero_fraction, "zstd-1-ratio": self.zstd1_ratio}


@dataclass
class Bench:
    """Everything one bench invocation measured: host, config, codec and loopback speeds, runs."""

    #: cores, cpu-model, kernel, memory, kvm, loadavg-before/-after (see :func:`.data.host_info`)
    host: dict[str, Any]
    config: BenchConfig
    data: DataSample | None = None
    codecs: dict[str, CodecSpeed] = field(default_factory=dict)
    #: method -> why its codec speed is missing
    codec_errors: dict[str, str] = field(default_factory=dict)
    loopback: LoopbackSpeed | None = None
    runs: list[Run] = field(default_factory=list)
    memory_runs: list[Run] = field(default_factory=list)
    #: what :meth:`.qemu_peer.QemuPeer.describe` said (empty without ``--peer``)
    peer_info: dict[str, Any] = field(default_factory=dict)

    @property
    def cores(self) -> int:
        return int(self.host["cores"])

    def rows(self) -> list[Row]:
        """The runs aggregated into table rows, each with its compute limit (when measured)."""
        rows = aggregate(self.runs)
        for row in rows:
            method = label_parts(row.method)[0]  # the same limit: neither TLS nor convergence is in the model
            codec = self.codecs.get(method)
            if method == AUTO:  # the limit of what it picked
                picks = sorted({p for p in (picked(r) for r in row.runs) if p})
                row.picked = "/".join(picks) or None
                codec = self.codecs.get(picks[0]) if len(picks) == 1 else None
            if codec is None or self.loopback is None:
                row.limit_note = self.codec_errors.get(method, "codec speed not measured")
                continue
            cap = row.bandwidth or self.config.link_rate
            row.limit_ms = compute_limit(self.config.memory, codec, self.loopback, cap, self.cores,
                                         self.config.channels).ms
        return rows

    def ok(self) -> bool:
        """True when every attempted run succeeded (n/a runs were not attempted)."""
        return all(r.ok or r.na for r in self.runs + self.memory_runs)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "config": self.config.to_json(),
            "data": self.data.to_json() if self.data else {},
            "codecs": {k: v.to_json() for k, v in self.codecs.items()},
            "codec-errors": self.codec_errors,
            "loopback": self.loopback.to_json() if self.loopback else None,
            "peer": self.peer_info,
            "rows": [r.to_json() for r in self.rows()],
            "memory-rows": [r.to_json() for r in aggregate(self.memory_runs)],
            "runs": [r.to_json() for r in self.runs],
            "memory-runs": [r.to_json() for r in self.memory_runs],
        }
