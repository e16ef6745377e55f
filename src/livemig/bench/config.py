"""What one ``livemig bench`` invocation measures (:class:`BenchConfig`), checked before anything runs.

:func:`parse_options` turns the command line into a :class:`BenchConfig` or raises
:class:`~livemig.errors.ParameterError` naming the option, the bad value and what is accepted.
Migration parameters (channels, method, level, max-bandwidth, downtime-limit) are checked by
:meth:`livemig.params.MigrationParameters.check`, one MigrationParameters per table row, so the bench
accepts exactly what ``livemig migrate`` accepts. Nothing here starts a process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..compress import available_methods
from ..compress.auto import AUTO, accepted
from ..errors import GuestError, ParameterError
from ..params import MigrationParameters, check_option, parse_option
from ..units import format_size, parse_rate
from ..wire.constants import PAGE_SIZE

DEFAULT_METHODS = "qatzip,zstd,none"
DEFAULT_MEMORY = "2G"
#: channel counts of ``--memory-table``
MEMORY_TABLE_CHANNELS = (2, 4, 8)
#: the multifd-compression methods that take a level (``--level``)
LEVELLED = ("zlib", "zstd", "qatzip")
#: QEMU parameter name (as MigrationParameters.check() writes it) -> the bench option that sets it
OPTION_OF = {
    "multifd_channels": "--multifd-channels",
    "multifd_compression": "--methods",
    "multifd_zlib_level": "--level",
    "multifd_zstd_level": "--level",
    "multifd_qatzip_level": "--level",
    "max_bandwidth": "--bandwidth",
    "downtime_limit": "--downtime-limit",
}
#: the smallest guest RAM the bench accepts (every guest; the KVM guest's own floor)
MIN_MEMORY = 2 << 20
UNCAPPED_WORDS = ("0", "unlimited", "uncapped", "none")
RATE_EXAMPLES = "a rate such as 1Gbps, 10Gbps, 500MiB/s, or 0 for uncapped"
#: how a row makes a busy guest's migration finish: plain precopy, capability auto-converge (vCPU
#: throttle), capability postcopy-ram (switch to post-copy after ``--postcopy-after-passes``)
CONVERGENCE = ("precopy", "auto-converge", "postcopy")


@dataclass(frozen=True)
class BenchConfig:
    """One bench invocation, every value checked (see :func:`parse_options`)."""

    methods: tuple[str, ...]
    #: max-bandwidth of each table, bytes/s (0 = uncapped)
    bandwidths: tuple[int, ...]
    channels: int
    #: guest RAM, bytes
    memory: int
    #: "kvm" or "portable"
    guest: str
    smp: int
    workload: str
    #: the ``--fill`` spec every guest and the data sample use
    fill: str
    fill_label: str
    level: int
    repeat: int
    peer: str | None = None
    #: ms; None = the engine's default
    downtime_limit: int | None = None
    #: bytes of the data sample for codec speeds (a multiple of one multifd packet)
    sample: int = 32 << 20
    #: seconds per run before it is killed
    timeout: float = 900.0
    memory_table: bool = False
    #: count socket bytes in a private network namespace
    netns: bool = True
    #: method -> why it cannot run here (None: it runs)
    unavailable: tuple[tuple[str, str | None], ...] = ()
    #: why the chosen guest cannot run here (None: it runs)
    guest_na: str | None = None
    #: run each row again over TLS (x509 made on the fly), labelled METHOD+tls
    tls: bool = False
    #: the dirty/counter workload's pages per second and working set in pages (None: migrate's defaults)
    dirty_rate: int | None = None
    working_set: int | None = None
    #: the rows of each method, side by side: a subset of :data:`CONVERGENCE`, in that order
    convergence: tuple[str, ...] = ("precopy",)
    #: post-copy rows: migrate-start-postcopy once precopy pass N runs
    postcopy_after_passes: int = 1

    def workload_args(self) -> tuple[str, ...]:
        """The workload's guest options (``livemig vm`` and ``livemig migrate`` take them alike)."""
        out: list[str] = []
        if self.dirty_rate is not None:
            out += ["--dirty-rate", str(self.dirty_rate)]
        if self.working_set is not None:
            out += ["--working-set", str(self.working_set)]
        return tuple(out)
    #: guest RAM sizes of a size sweep (``--memory 1G,4G,8G``), bytes; ``memory`` is the one this bench runs
    memories: tuple[int, ...] = ()
    #: link rates of ``--link-rate`` (bytes/s): the namespace's loopback shaped with tc tbf
    link_rates: tuple[int, ...] = ()
    #: the link rate this bench runs at (bytes/s, 0 = loopback unshaped); its rows have max-bandwidth off
    link_rate: int = 0

    def method_na(self, method: str) -> str | None:
        """Why ``method``'s livemig runs are n/a here (method or guest missing), else None."""
        reason = dict(self.unavailable).get(method)
        if reason is None and self.guest_na:
            reason = f"{self.guest} guest: {self.guest_na}"
        return reason

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["unavailable"] = dict(self.unavailable)
        return {k.replace("_", "-"): v for k, v in d.items()}


def _list(text: str, option: str) -> list[str]:
    """The comma-separated items of ``option``; ParameterError for an empty list, an empty item
    (``1G,,``) or an item given twice (``zstd,zstd``), naming the option."""
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise ParameterError(f"{option}: empty list")
    if not all(items):
        raise ParameterError(f"{option}: empty item in '{text}' (give items separated by single commas)")
    seen = [t.lower() for t in items]
    twice = sorted({t for t in items if seen.count(t.lower()) > 1})
    if twice:
        raise ParameterError(f"{option}: {', '.join(repr(t) for t in twice)} given more than once in '{text}'")
    return items


def parse_bandwidths(text: str) -> list[int]:
    """``1Gbps,10Gbps,0`` -> bytes/s per item (0 = uncapped). ParameterError names ``--bandwidth``."""
    out = []
    for t in _list(text, "--bandwidth"):
        if t.lower() in UNCAPPED_WORDS:
            out.append(0)
            continue
        try:
            out.append(parse_rate(t))
        except ParameterError as exc:
            raise ParameterError(f"--bandwidth: '{t}' is not {RATE_EXAMPLES}") from exc
    return out


def _size(text: str, option: str, minimum: int, multiple: int = 1) -> int:
    """A size option in bytes, at least ``minimum`` and a multiple of ``multiple`` (ParameterError naming it)."""
    value = parse_option(option, text, "size")
    if value % multiple or value < minimum:
        what = f"a multiple of {multiple} bytes of" if multiple > 1 else "a size of"
        raise ParameterError(f"{option} {text}: expected {what} at least {format_size(minimum)}")
    return value


def check_guest(guest: str, memory: int, smp: int, workload: str, fill: str) -> None:
    """The guest ``--memory``, ``--smp`` and ``--fill`` ask for can be created (ParameterError naming the option).

    ``--memory`` is already a multiple of 4096 of at least :data:`MIN_MEMORY` (:func:`parse_options`;
    the KVM guest's floor, kept for every guest so tables compare); the KVM guest's own layout check
    (``Layout.of``: at most 256 GiB, room for the vCPUs' pages) is applied when KVM is the guest. A fill must exist:
    ``files:DIR`` a directory with data, ``image:PATH`` a file no larger than RAM.
    """
    from ..accel.sample import check_fill
    from ..guest.base import GuestConfig

    if guest == "kvm":
        from ..guest.kvm.longmode import Layout

        try:
            Layout.of(GuestConfig(kind=guest, memory=memory, smp=smp, workload=workload, fill=fill))
        except GuestError as exc:
            raise ParameterError(f"--memory/--smp: {exc}") from exc
    try:
        check_fill(fill, memory)
    except GuestError as exc:
        raise ParameterError(f"--fill: {exc}") from exc


def check_row(method: str, channels: int, bandwidth: int, level: int, downtime_limit: int | None) -> None:
    """The migration parameters of one table row, checked as ``livemig migrate`` checks them.

    Raises ParameterError "<option>: <QEMU's message>" (the option that set the bad parameter).
    """
    fields: dict[str, Any] = {
        "multifd_channels": channels,
        "multifd_compression": method,
        "max_bandwidth": bandwidth,
    }
    if method in LEVELLED:
        fields[f"multifd_{method}_level"] = level
    if downtime_limit is not None:
        fields["downtime_limit"] = downtime_limit
    try:
        MigrationParameters(**fields).check()
    except ParameterError as exc:
        m = re.search(r"Parameter '([^']+)'", str(exc))
        option = OPTION_OF.get(m.group(1).replace("-", "_"), "option") if m else "option"
        raise ParameterError(f"{option}: {exc}") from exc


def parse_options(args: argparse.Namespace) -> BenchConfig:
    """Check every option of ``livemig bench`` and resolve the guest; ParameterError on the first bad one."""
    methods = _list(args.methods, "--methods")
    unknown = [m for m in methods if m not in accepted()]
    if unknown:
        raise ParameterError(
            f"--methods: unknown method(s) {', '.join(repr(m) for m in unknown)}"
            f" (accepted: {', '.join(accepted())})"
        )
    bandwidths = parse_bandwidths(args.bandwidth)
    memories = [_size(t, "--memory", MIN_MEMORY, PAGE_SIZE) for t in _list(args.memory, "--memory")]
    memory = memories[0]
    link_rates = parse_link_rates(getattr(args, "link_rate", None))
    if link_rates and args.no_netns:
        raise ParameterError("--link-rate: the link is shaped in the bench's private network namespace;"
                             " it cannot be used with --no-netns")
    sample = _size(args.sample, "--sample", 128 * PAGE_SIZE)
    sample = max(sample - sample % (128 * PAGE_SIZE), 128 * PAGE_SIZE)  # whole multifd packets
    check_option("--repeat", args.repeat, minimum=1, what="a number of runs")
    check_option("--smp", args.smp, minimum=1, what="a number of vCPUs")
    check_option("--timeout", args.timeout, minimum=0, above=True, what="a number of seconds")
    for option, value in (("--dirty-rate", args.dirty_rate), ("--working-set", args.working_set)):
        if value is not None:
            check_option(option, value, what="pages per second" if option == "--dirty-rate" else "a number of pages")
    channels = [args.multifd_channels, *(MEMORY_TABLE_CHANNELS if args.memory_table else ())]
    for m in methods:
        for bw in bandwidths:
            for ch in channels:
                check_row(m, ch, bw, args.level, args.downtime_limit)
    if args.corpus:
        if not os.path.isdir(args.corpus):
            raise ParameterError(f"--corpus: '{args.corpus}' is not a directory")
        fill = f"files:{os.path.abspath(args.corpus)}"
        fill_label = f"the files of {args.corpus}"
    else:
        fill = args.fill
        fill_label = "the built-in corpus" if fill == "corpus" else f"'{fill}' data"
    after = getattr(args, "postcopy_after_passes", None)
    after = 1 if after is None else after
    check_option("--postcopy-after-passes", after, minimum=1, what="a number of precopy passes")
    guest, guest_na = _guest(args.guest)
    for size in memories:
        check_guest(guest, size, args.smp, args.workload, fill)
    unavailable: dict[str, str | None] = {**available_methods(), AUTO: None}
    return BenchConfig(
        methods=tuple(methods),
        bandwidths=tuple(bandwidths),
        channels=args.multifd_channels,
        memory=memory,
        guest=guest,
        smp=args.smp,
        workload=args.workload,
        fill=fill,
        fill_label=fill_label,
        level=args.level,
        repeat=args.repeat,
        peer=args.peer,
        downtime_limit=args.downtime_limit,
        sample=sample,
        timeout=args.timeout,
        memory_table=args.memory_table,
        netns=not args.no_netns,
        unavailable=tuple((m, unavailable[m]) for m in methods),
        guest_na=guest_na,
        tls=bool(getattr(args, "tls", False)),
        dirty_rate=args.dirty_rate,
        working_set=args.working_set,
        convergence=parse_convergence(getattr(args, "convergence", None), args.auto_converge,
                                      getattr(args, "postcopy_ram", False)),
        postcopy_after_passes=after,
        memories=tuple(memories),
        link_rates=tuple(link_rates),
    )


def parse_convergence(text: str | None, auto_converge: bool, postcopy_ram: bool) -> tuple[str, ...]:
    """The rows of each method: ``--convergence precopy,auto-converge,postcopy`` (any subset, shown in
    that order), else plain precopy plus a row per flag given (``--auto-converge``,
    ``--postcopy-ram``). ParameterError names the option and the accepted words."""
    if text is None:
        wanted = {"precopy", *(["auto-converge"] if auto_converge else []), *(["postcopy"] if postcopy_ram else [])}
    else:
        items = _list(text, "--convergence")
        unknown = [t for t in items if t not in CONVERGENCE]
        if unknown:
            raise ParameterError(f"--convergence: unknown {', '.join(repr(t) for t in unknown)} "
                                 f"(accepted: {', '.join(CONVERGENCE)})")
        if auto_converge or postcopy_ram:
            raise ParameterError("--convergence lists the rows itself: leave out --auto-converge and --postcopy-ram "
                                 "(or --convergence)")
        wanted = set(items)
    return tuple(c for c in CONVERGENCE if c in wanted)


def sections(c: BenchConfig) -> list[BenchConfig]:
    """One bench per guest size of ``--memory``, each followed by one per ``--link-rate`` (rows with
    max-bandwidth off, the link shaped); a plain bench is its own one section."""
    out: list[BenchConfig] = []
    for mem in c.memories or (c.memory,):
        out.append(dataclasses.replace(c, memory=mem, link_rate=0))
        out += [dataclasses.replace(c, memory=mem, link_rate=lr, bandwidths=(0,)) for lr in c.link_rates]
    return out


def parse_link_rates(text: str | None) -> list[int]:
    """``--link-rate 1Gbit,10Gbit`` -> bytes/s per item (none given: []). ParameterError names the option."""
    if not text:
        return []
    out = []
    for t in _list(text, "--link-rate"):
        try:
            rate = parse_rate(t)
        except ParameterError as exc:
            raise ParameterError(f"--link-rate: '{t}' is not a rate such as 1Gbit, 10Gbit or 500MiB/s") from exc
        if rate <= 0:
            raise ParameterError(f"--link-rate: '{t}': expected a rate above 0 (leave the option out for an "
                                 "unshaped loopback)")
        out.append(rate)
    return out


def _guest(choice: str | None) -> tuple[str, str | None]:
    """(guest kind, why it cannot run here or None): ``--guest`` or kvm where it works."""
    from ..guest import kvm_unavailable

    try:
        kvm_na = kvm_unavailable()
    except Exception as exc:  # an incomplete KVM module must not take the bench down
        kvm_na = f"KVM guest support is broken here: {exc!r}"
    guest = choice or ("kvm" if kvm_na is None else "portable")
    return guest, (kvm_na if guest == "kvm" else None)
