"""The transport seam: the real address listener/connector and the in-memory link behave alike."""

from __future__ import annotations

import pytest

from livemig.errors import TransportError
from livemig.transport.address import parse_address
from livemig.transport.sockets import AddressConnector, AddressListener, Connector, Listener, SocketPairLink


def _pair(kind: str) -> tuple[Connector, Listener]:
    if kind == "memory":
        link = SocketPairLink()
        return link, link
    lst = AddressListener(parse_address("tcp:127.0.0.1:0"), 4)
    assert lst.port > 0
    return AddressConnector(parse_address(f"tcp:127.0.0.1:{lst.port}")), lst


@pytest.mark.parametrize("kind", ["memory", "tcp"])
def test_connections_arrive_in_order_and_carry_bytes(kind: str) -> None:
    conn, lst = _pair(kind)
    assert lst.accept(0.01) is None  # nothing yet: a timeout is not an error
    a, b = conn.connect(5), conn.connect(5)
    a.sendall(b"first")
    b.sendall(b"second")
    got = [lst.accept(5), lst.accept(5)]
    assert all(s is not None for s in got)
    assert [s.recv(16) for s in got if s is not None] == [b"first", b"second"]
    lst.close()
    with pytest.raises(TransportError):
        lst.accept(0.01)
    for s in (a, b, *[s for s in got if s is not None]):
        s.close()


def test_closed_in_memory_link_refuses_and_closes_what_was_pending() -> None:
    link = SocketPairLink()
    mine = link.connect(1)
    link.close()
    assert mine.recv(1) == b""  # the unaccepted end was closed: the connector sees EOF
    with pytest.raises(TransportError, match="closed"):
        link.connect(1)
    mine.close()
