"""``multifd-compression auto`` on a source: the pick, made at setup (docs/wire.md, "Parameters")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..compress import create_method
from ..compress.auto import choose
from ..transport.sockets import AddressConnector
from .tlsopts import is_loopback

if TYPE_CHECKING:
    from .source import Source


def resolve_auto(src: Source) -> None:
    """``multifd-compression auto``: pick the method (:func:`livemig.compress.auto.choose`), say
    which and why (log, statistics), and send an ordinary stream of it from here on."""
    c: Any = src.connector
    while not isinstance(c, AddressConnector) and hasattr(c, "inner"):  # TLS wraps the address's
        c = c.inner
    addr = c.addr if isinstance(c, AddressConnector) else None
    choice = choose(list(src.views.values()), src.guest.ram_size, src.params.multifd_channels,
                    src.params.max_bandwidth, same_host=addr is None or is_loopback(addr),
                    host=addr.host if addr is not None and addr.scheme == "tcp" else None,
                    zero_pages_free=src.params.zero_page_detection == "multifd")
    src.method = src.channels.ctx.method = create_method(choice.method, choice.level or 1, src.page_size)
    src.stats.method, src.stats.level = src.method.name, choice.level
    src.stats.backend, src.stats.accelerated = src.method.backend(), src.method.accelerated()
    src.stats.auto = choice.to_json()
    src.log(f"multifd-compression auto: {choice.label}, {choice.reason}")
