"""The destination side of post-copy (capability ``postcopy-ram``; docs/postcopy.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MigrationError
from ..transport.sockets import Listener

if TYPE_CHECKING:
    from .destination import Destination


class PostcopyDestination:
    """The post-copy half of one :class:`~.destination.Destination`."""

    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        #: "" before post-copy, then postcopy-active / postcopy-paused / postcopy-recover / completed
        self.status = ""

    def recover(self, listener: Listener) -> None:
        raise MigrationError("post-copy recovery is not implemented yet")
