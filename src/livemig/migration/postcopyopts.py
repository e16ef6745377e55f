"""The post-copy options of ``livemig migrate``, ``incoming`` and ``bench`` (docs/postcopy.md)."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import MigrationError, ParameterError
from ..params import check_option
from ..transport.secure import tls_listener
from . import state

if TYPE_CHECKING:
    from ..transport.address import Address
    from ..transport.sockets import Connector, Listener
    from ..transport.tls import Tls
    from .destination import Destination
    from .source import Source


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


# --- recovery on the command line -------------------------------------------------------------------
#: seconds between a paused source's reconnection attempts
RETRY = 1.0


def resume_when_paused(src: Source, connector: Connector, say: Callable[[str], None]) -> None:
    """``livemig migrate``: a post-copy that pauses (the link broke) reconnects through ``connector``
    (the same destination address) every :data:`RETRY` seconds, as ``migrate URI resume=true`` would,
    until the destination takes it (:func:`recover_when_paused`) or Ctrl-C gives the guest up."""
    def attempt() -> None:
        if not told:  # after the engine said why it paused
            told.append("")
            say("post-copy paused: reconnecting to the destination every second "
                "(Ctrl-C gives the guest up: neither side holds all of it)")
        try:
            src.resume(connector)
        except MigrationError:
            pass  # no longer paused (resumed, or given up)

    def on_status(new: str) -> None:
        if new != state.POSTCOPY_PAUSED:
            return
        timer = threading.Timer(RETRY, attempt)
        timer.daemon = True
        timer.start()

    told: list[str] = []
    src.status.listeners.append(on_status)


def recover_when_paused(dst: Destination, address: Address, tls: Tls | None, say: Callable[[str], None],
                        done: threading.Event) -> threading.Thread:
    """``livemig incoming``: when post-copy pauses, stop the first listener and listen again on the same
    address and port (``migrate-recover`` with the same URI) for the source's reconnection
    (:func:`resume_when_paused`); a failed attempt listens again. Runs until ``done`` is set."""
    def watch() -> None:
        listener: Listener | None = None
        try:
            while not done.wait(0.05):
                if dst.postcopy_status != state.POSTCOPY_PAUSED:
                    continue
                if listener is None:
                    dst.gate.close()
                    where = address.with_port(dst.port)
                    listener = tls_listener(where, tls, 1)
                    say(f"post-copy paused: the guest waits for its pages; listening again on {where} for the "
                        "source (Ctrl-C gives the guest up: neither side holds all of it)")
                try:  # again after each failed attempt (a stranger, a source that gave up)
                    dst.recover(listener)
                except MigrationError:
                    pass  # no longer paused
        except MigrationError as exc:  # the address cannot be bound again: say so once, stay paused
            say(f"post-copy paused and cannot listen again: {exc}")
        finally:
            if listener is not None:
                listener.close()

    t = threading.Thread(target=watch, name="postcopy-recover", daemon=True)
    t.start()
    return t
