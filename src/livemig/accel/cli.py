"""``livemig accel`` (accelerator inventory) and ``livemig advise`` (which method to use)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..compress import create_method, get_method, method_names
from ..compress.libqatzip import quiet_stderr
from ..errors import GuestError, MethodUnavailable, ParameterError
from ..params import check_option, parse_option
from ..wire.constants import PAGE_SIZE
from .inventory import Inventory, scan
from .sample import FILLS, check_fill


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``accel`` and ``advise``."""
    p = subparsers.add_parser(
        "accel",
        help="list compression accelerators (QAT, IAA, UADK) and which of their libraries load",
        description="List this host's QAT PCI functions, IAA work queues and UADK devices, the "
        "accelerator libraries that load, and the backend each compression method uses here.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sysfs", default="/sys", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_accel)

    a = subparsers.add_parser(
        "advise",
        help="measure each method on a sample and recommend one for a link",
        description="Measure every available compression method's speed and ratio on a sample of "
        "guest pages (with as many threads at once as cores), predict pages/s and each side's CPU use for "
        "the link, and recommend one. Source and destination are taken to be separate hosts with --cores "
        "cores each, or with --local both on this host, sharing its cores (as livemig migrate --local and "
        "livemig bench run).",
    )
    a.add_argument("--bandwidth", default="10Gbps", metavar="RATE",
                   help="link speed, e.g. 10Gbps, 25Gbps, 1GB/s (0: unlimited; default 10Gbps)")
    a.add_argument("--multifd-channels", type=int, default=2, metavar="N", help="1..255 (QEMU default 2)")
    a.add_argument("--cores", type=int, metavar="N", help="cores available to each side (default: this host's)")
    a.add_argument("--fill", default="corpus", metavar="FILL", help=f"sample data: {FILLS}")
    a.add_argument("--sample-size", default="16M", metavar="SIZE",
                   help="sample size, at least one 512K multifd packet (default 16M)")
    a.add_argument("--methods", metavar="LIST",
                   help="candidates, e.g. qatzip:1,qatzip:9,zstd:1,qpl (default: each at its default level)")
    a.add_argument("--local", action="store_true",
                   help="both ends on this host, sharing its cores (what livemig bench measures)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.set_defaults(func=cmd_advise)


def _methods() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in method_names():
        try:
            cls = get_method(name)
            m = create_method(name, cls.levels[0] if cls.levels and cls.levels[0] > 0 else 1)
            out.append({"method": name, "available": True, "accelerated": m.accelerated(), "backend": m.backend()})
        except MethodUnavailable as exc:
            out.append({"method": name, "available": False, "accelerated": False, "backend": str(exc)})
    return out


def render_inventory(inv: Inventory, methods: list[dict[str, Any]]) -> str:
    """The table ``livemig accel`` prints."""
    lines: list[str] = []
    sysfs = Path(inv.sysfs)
    lines.append(f"QAT (Intel QuickAssist) PCI functions: {len(inv.qat) or 'none found'}"
                 + ("" if inv.qat else f" (no 8086 QAT device id in {sysfs / 'bus/pci/devices'})"))
    if inv.qat:
        lines.append(f"  {'address':14} {'model':8} {'fn':3} {'driver':12} {'iommu':6} {'numa':5} vfio")
        for q in inv.qat:
            lines.append(
                f"  {q.address:14} {q.model:8} {q.function:3} {q.driver or '-':12} {q.iommu_group or '-':6} "
                f"{q.numa_node or '-':5} {q.vfio}"
            )
    lines.append(f"IAA (idxd/iax) devices: {len(inv.iaa) or 'none found'}"
                 + ("" if inv.iaa or (sysfs / "bus/dsa").is_dir() else f" (no {sysfs / 'bus/dsa'}: idxd not loaded)")
                 + (f"; IAA PCI functions: {', '.join(inv.iaa_pci)}" if inv.iaa_pci else ""))
    for d in inv.iaa:
        svm = {True: "SVM (PASID) on", False: "SVM (PASID) off", None: "SVM unknown"}[d.pasid_enabled]
        lines.append(f"  {d.name}: state {d.state or '-'}, {svm}, {len(d.work_queues)} work queue(s)")
        for wq in d.work_queues:
            lines.append(
                f"    {wq['name']}: {wq.get('state') or '-'}, mode {wq.get('mode') or '-'}, "
                f"type {wq.get('type') or '-'}, size {wq.get('size') or '-'}, name {wq.get('wq_name') or '-'}"
            )
    lines.append(f"UADK (uacce) devices: {len(inv.uacce) or 'none found'}"
                 + ("" if inv.uacce or (sysfs / "class/uacce").is_dir() else f" (no {sysfs / 'class/uacce'})"))
    for u in inv.uacce:
        sva = {True: "SVA", False: "no SVA", None: "SVA unknown"}[u.sva]
        lines.append(
            f"  {u.name}: api {u.api or '-'}, {sva}, algorithms {' '.join(u.algorithms) or '-'}, "
            f"available instances {u.available_instances or '-'}"
        )
    lines.append("Libraries:")
    for lib in inv.libraries:
        lines.append(f"  {lib.name:22} {'loads' if lib.loads else 'no':5}  {lib.detail}")
    lines.append("Methods:")
    for m in methods:
        state = "hardware" if m["accelerated"] else ("cpu" if m["available"] else "unavailable")
        lines.append(f"  {m['method']:7} {state:11} {m['backend']}")
    return "\n".join(lines)


def cmd_accel(args: argparse.Namespace) -> int:
    with quiet_stderr():
        inv = scan(Path(args.sysfs))
        methods = _methods()
    if args.json:
        json.dump({**inv.to_json(), "methods": methods}, sys.stdout, indent=2)
        print()
    else:
        print(render_inventory(inv, methods))
    return 0


def _advise_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``livemig advise``, checked (ParameterError naming the option) before measuring."""
    from ..advise import PACKET_PAGES, parse_candidates

    bandwidth = parse_option("--bandwidth", args.bandwidth, "rate")
    check_option("--multifd-channels", args.multifd_channels, minimum=1, maximum=255, what="a number of channels")
    if args.cores is not None:
        check_option("--cores", args.cores, minimum=1, what="a number of cores")
    sample_bytes = parse_option("--sample-size", args.sample_size, "size")
    check_option("--sample-size", sample_bytes, minimum=PACKET_PAGES * PAGE_SIZE, what="a size in bytes")
    try:
        check_fill(args.fill)
    except GuestError as exc:
        raise ParameterError(f"--fill: {exc}") from exc
    parse_candidates(args.methods)
    return {"bandwidth": bandwidth, "channels": args.multifd_channels, "sample": args.fill,
            "sample_bytes": sample_bytes, "candidates": args.methods, "cores": args.cores,
            "same_host": args.local}


def cmd_advise(args: argparse.Namespace) -> int:
    from ..advise import advise, render

    options = _advise_options(args)
    with quiet_stderr():
        inv = scan()
    adv = advise(**options, inventory=inv)
    if args.json:
        json.dump(adv.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(render(adv))
    return 0
