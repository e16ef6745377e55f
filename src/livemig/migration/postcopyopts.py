"""The post-copy options of ``livemig migrate``, ``incoming`` and ``bench`` (docs/postcopy.md)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ParameterError
from ..params import check_option


def add_postcopy_options(p: argparse.ArgumentParser, source: bool) -> None:
    """``--postcopy-ram`` (QEMU's capability), ``--max-postcopy-bandwidth`` and, on a source,
    ``--postcopy-after-passes`` (docs/postcopy.md); shared by ``livemig migrate``, ``incoming`` and ``bench``."""
    g = p.add_argument_group("post-copy (QEMU's capability postcopy-ram)")
    g.add_argument("--postcopy-ram", action="store_true",
                   help="allow post-copy: the guest resumes on the destination before all of its RAM arrived "
                        "and pulls the pages it touches (give it on both sides)")
    if source:
        g.add_argument("--postcopy-after-passes", type=int, default=None, metavar="N",
                       help="with --postcopy-ram: switch to post-copy after N precopy passes unless precopy "
                            "converged first (default 1)")
    g.add_argument("--max-postcopy-bandwidth", default="0", metavar="RATE",
                   help="cap on the post-copy page stream, as --max-bandwidth (default 0: --max-bandwidth's cap)")


def check_postcopy(args: argparse.Namespace) -> None:
    """The post-copy options of ``livemig migrate``: ParameterError naming the first bad one."""
    after = getattr(args, "postcopy_after_passes", None)
    if after is not None:
        if not args.postcopy_ram:
            raise ParameterError("--postcopy-after-passes needs --postcopy-ram")
        check_option("--postcopy-after-passes", after, minimum=1, what="a number of passes")
    if args.postcopy_ram and getattr(args, "peer", "livemig") == "qemu":
        raise ParameterError("--postcopy-ram with a QEMU peer is not supported: livemig does post-copy with "
                             "livemig only")


def postcopy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~.source.Source` keywords of a checked ``livemig migrate`` command line."""
    if not args.postcopy_ram:
        return {}
    return {"postcopy_ram": True, "postcopy_after_passes": args.postcopy_after_passes or 1}
