"""The guest options of ``livemig migrate``, ``livemig incoming`` and ``livemig vm``, in one place.

:func:`add_guest_options` adds them to a parser; :func:`guest_config_from_args` turns them into a
:class:`~livemig.guest.GuestConfig` checked with :meth:`GuestConfig.check` (the bounds the guest
kinds enforce themselves) before any guest, destination or socket exists: a bad value is a
ParameterError naming the option, exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Literal

from ..errors import GuestError, ParameterError
from ..guest import GuestConfig, default_kind, kvm_unavailable
from ..params import check_option, parse_option
from ..units import format_size
from .stats import host_memory_limit

Role = Literal["migrate", "incoming", "vm"]

WORKLOADS_HELP = ("what the vCPUs do: idle (nothing: RAM stays as filled, no progress counter), dirty (write "
                  "pages of the working set at --dirty-rate, the pages a migration must send again), counter "
                  "(each vCPU steps a checkable chain of values through the working set at --dirty-rate")

#: the end of the counter workload's help, by role: only options that command has
_COUNTER_CHECK = {"migrate": "; with --local and --run-after the destination checks every value)",
                  "vm": ")"}

#: GuestConfig field -> its option
_OPTIONS = {"kind": "--guest", "memory": "--memory", "smp": "--smp", "workload": "--workload",
            "dirty_rate": "--dirty-rate", "working_set": "--working-set", "fill": "--fill", "seed": "--seed"}


def add_guest_options(p: argparse.ArgumentParser, role: Role) -> None:
    """Add --guest, --memory, --smp, --workload, --dirty-rate, --working-set, --fill and --seed.

    ``role`` "incoming": --memory has no default (the source's size) and the help says which options
    must match the source and which the source's config replaces; "vm" also accepts ``-m``.
    """
    g = p.add_argument_group("guest")
    incoming = role == "incoming"
    g.add_argument("--guest", choices=["kvm", "portable"], default=None,
                   help="guest kind (default: kvm where /dev/kvm works, else portable)"
                        + ("; must be the source's" if incoming else ""))
    names = ["-m", "--memory"] if role == "vm" else ["--memory"]
    if incoming:
        g.add_argument(*names, default=None, metavar="SIZE",
                       help="guest RAM, the same as the source's, prefaulted before the migration (default: "
                            "the source's size, the guest then created and prefaulted during the migration)")
    else:
        g.add_argument(*names, default="1G", metavar="SIZE",
                       help="guest RAM: 512M, 2G, ... (KVM: 2M..256G; default 1G)")
    g.add_argument("--smp", type=int, default=1, metavar="N",
                   help="vCPUs: 1..64 (KVM; default 1)" + ("; with --memory, must be the source's" if incoming else ""))
    if incoming:
        ignored = "ignored here: the source's config replaces it when the migration starts"
        g.add_argument("--workload", choices=["idle", "dirty", "counter"], default="idle", help=ignored)
        g.add_argument("--dirty-rate", type=int, default=20000, metavar="PAGES_PER_S", help=ignored)
        g.add_argument("--working-set", type=int, default=0, metavar="PAGES", help=ignored)
        g.add_argument("--fill", default="corpus", help=f"{ignored} (incoming RAM starts zero)")
        g.add_argument("--seed", type=int, default=0, help=ignored)
        return
    g.add_argument("--workload", choices=["idle", "dirty", "counter"], default="idle",
                   help=WORKLOADS_HELP + _COUNTER_CHECK[role] + " (default idle)")
    g.add_argument("--dirty-rate", type=int, default=20000, metavar="PAGES_PER_S",
                   help="pages per second the dirty and counter workloads write, all vCPUs together "
                        "(0 = as fast as they can; default 20000)")
    g.add_argument("--working-set", type=int, default=0, metavar="PAGES",
                   help="pages the workload writes over and over (0 = all RAM; default 0)")
    g.add_argument("--fill", default="corpus",
                   help="RAM contents at start: zero, random, corpus (compressible like real data), files:DIR "
                        "(the files of DIR, cycled) or image:PATH (a raw image at the start of RAM) "
                        "(default corpus)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random fill and the workloads (default 0)")


def guest_config_from_args(args: argparse.Namespace) -> GuestConfig:
    """The guest options, checked (ParameterError naming the option); tells on stderr when the portable
    guest replaces a missing KVM."""
    memory = parse_option("--memory", args.memory, "size")
    check_option("--smp", args.smp, minimum=1, what="a number of vCPUs")
    check_option("--dirty-rate", args.dirty_rate, what="pages per second")
    check_option("--working-set", args.working_set, what="a number of pages")
    kind = args.guest or default_kind()
    cfg = GuestConfig(kind=kind, memory=memory, smp=args.smp, workload=args.workload, dirty_rate=args.dirty_rate,
                      working_set=args.working_set, fill=args.fill, seed=args.seed)
    try:
        cfg.check()
    except GuestError as exc:
        field = getattr(exc, "field", "")
        option = _OPTIONS.get(field, "--guest")
        shown = args.memory if field == "memory" else getattr(args, option[2:].replace("-", "_"))
        detail = re.sub(rf"^(guest )?{field} \S+(: | )", "", str(exc)) if field else str(exc)
        raise ParameterError(f"{option} {shown}: {detail}") from exc
    limit = host_memory_limit()
    if memory > limit:
        raise ParameterError(f"--memory {args.memory}: more than this host can give a guest now "
                             f"({format_size(limit)}: free memory less a margin)")
    if args.guest is None and kind == "portable":
        print(f"livemig: /dev/kvm not usable ({kvm_unavailable()}): using the portable guest", file=sys.stderr)
    return cfg
