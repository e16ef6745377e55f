"""The test relay itself: it passes bytes both ways, and drops, delays, silences and cuts on cue."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from support.relay import Relay, Tap


class Peer:
    """A target that accepts connections and records them (the destination's end of the link)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.accepted: list[socket.socket] = []
        self.ready = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.listener.accept()
            except OSError:
                return
            s.settimeout(5)
            self.accepted.append(s)
            self.ready.release()

    def next(self) -> socket.socket:
        assert self.ready.acquire(timeout=5)
        return self.accepted[-1]

    def close(self) -> None:
        self.listener.close()
        for s in self.accepted:
            s.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


def _connect(relay: Relay) -> socket.socket:
    return socket.create_connection(("127.0.0.1", relay.port), timeout=5)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_passes_binary_and_lines_both_ways_on_every_connection(peer: Peer) -> None:
    blob = bytes(range(256)) * 1000 + b"{\"tail\": 1"  # ends in a partial JSON-looking line
    with Relay(peer.addr, up=Tap(), down=Tap()) as relay:
        for _ in range(2):  # the main connection (with taps) and a plain one
            c = _connect(relay)
            d = peer.next()
            c.sendall(blob)
            c.shutdown(socket.SHUT_WR)
            assert _read_all(d) == blob
            d.sendall(b"{\"type\":\"ready\"}\nrest")
            d.close()
            assert _read_all(c) == b"{\"type\":\"ready\"}\nrest"
            c.close()
        assert relay.down is not None and relay.down.lines == [b"{\"type\":\"ready\"}\n"]


def test_drop_the_line_after_n_lines_and_match_by_text(peer: Peer) -> None:
    down = Tap(drop=1)
    up = Tap(drop=b"\"commit\"")
    with Relay(peer.addr, up=up, down=down) as relay:
        c, d = _connect(relay), peer.next()
        d.sendall(b"a\nb\nc\n")
        d.shutdown(socket.SHUT_WR)
        assert _read_all(c) == b"a\nc\n"
        c.sendall(b"{\"type\":\"commit\"}\n{\"type\":\"commit\"}\n")
        c.close()
        assert _read_all(d) == b"{\"type\":\"commit\"}\n"  # only the first match is dropped
    assert down.dropped == [b"b\n"] and down.lines == [b"a\n", b"b\n", b"c\n"]


def test_silence_after_a_line_keeps_the_connection_open(peer: Peer) -> None:
    with Relay(peer.addr, down=Tap(silence_after=0)) as relay:
        c, d = _connect(relay), peer.next()
        d.sendall(b"ready\nresumed\n")
        assert c.recv(100) == b"ready\n"
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):  # nothing more, and no EOF either
            c.recv(100)
        c.sendall(b"still up\n")  # the other direction still works
        assert d.recv(100) == b"still up\n"


def test_cut_after_a_line_closes_both_ways(peer: Peer) -> None:
    with Relay(peer.addr, down=Tap(cut_after=b"prepared")) as relay:
        c, d = _connect(relay), peer.next()
        d.sendall(b"ready\nprepared\nresumed\n")
        assert _read_all(c) == b"ready\nprepared\n"
        assert _read_all(d) == b""  # the destination sees the source go away


def test_relay_cut_now(peer: Peer) -> None:
    with Relay(peer.addr) as relay:
        c, d = _connect(relay), peer.next()
        deadline = time.monotonic() + 5
        while not relay.conns and time.monotonic() < deadline:  # the relay registers it after the peer accepted
            time.sleep(0.01)
        relay.cut()
        assert _read_all(c) == b"" and _read_all(d) == b""


def test_delay_holds_the_line_and_what_follows(peer: Peer) -> None:
    with Relay(peer.addr, down=Tap(delay=(b"resumed", 1.5))) as relay:
        c, d = _connect(relay), peer.next()
        d.sendall(b"prepared\nresumed\nreport\n")
        c.settimeout(5)
        assert c.recv(100) == b"prepared\n"
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(100)
        c.settimeout(5)
        got = b""
        while got != b"resumed\nreport\n":
            got += c.recv(100)
