"""A waiting destination that a stranger cannot stop (issue 9, report 3).

Idle, garbage, dribbling, wrong-uuid and second-main connections are logged (peer address and
reason) and dropped while the destination keeps waiting; the real source then gets in. No log line
or error quotes the destination's uuid. A guest larger than --max-memory is refused before anything
is allocated.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid as uuidlib
from typing import Any

import pytest

from livemig.guest.base import GuestConfig
from livemig.migration import protocol
from livemig.migration.destination import Destination
from livemig.migration.handover import ReturnPath
from livemig.migration.source import MACHINE_TYPE, Source
from livemig.migration.stats import host_memory_limit
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from livemig.wire import handshake, stream
from support.fakeguest import FakeGuest

MEM = 4 << 20
SECRET = uuidlib.UUID("8f2b6c1e-3d4a-4b5c-9e7f-0123456789ab")
PARAMS = MigrationParameters(multifd_channels=2, max_bandwidth=0)


class Waiting:
    """A Destination (uuid SECRET) running in a thread, its log lines collected."""

    def __init__(self, timeout: float = 1.0, guest: bool = True, max_memory: int | None = None,
                 params: MigrationParameters = PARAMS) -> None:
        self.logs: list[str] = []
        self.guest = FakeGuest(GuestConfig(memory=MEM), incoming=True) if guest else None
        self.d = Destination(parse_address("tcp:127.0.0.1:0"), params, guest=self.guest, uuid=SECRET.bytes,
                             timeout=timeout, max_memory=max_memory, log=self.logs.append)
        self.out: dict[str, Any] = {}
        self.t = threading.Thread(target=lambda: self.out.update(self.d.run()))
        self.t.start()

    def connect(self, data: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.d.port))
        if data:
            s.sendall(data)
        return s

    def wait_log(self, words: str, within: float = 8.0) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in list(self.logs):
                if words in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line with {words!r} in {self.logs}")

    def migrate(self, params: MigrationParameters = PARAMS) -> None:
        src = FakeGuest(GuestConfig(memory=MEM, seed=5))
        stats = Source(src, parse_address(f"tcp:127.0.0.1:{self.d.port}"), params, uuid=SECRET.bytes,
                       timeout=5).run()
        self.t.join(timeout=15)
        assert stats.status == "completed", stats.error
        assert self.out["status"] == "completed" and self.out["resumed"] is True

    def no_secret(self) -> None:
        text = json.dumps([self.logs, self.out])
        assert str(SECRET) not in text and SECRET.hex not in text


def _config(memory: int, version: int = protocol.VERSION, uuid: bytes = SECRET.bytes) -> bytes:
    cfg = {"protocol": version, "uuid": uuid.hex(), "guest": json.loads(GuestConfig(memory=memory).to_json()),
           "page-size": 4096,
           "multifd-channels": PARAMS.multifd_channels, "multifd-compression": "none",
           "blocks": [["pc.ram", memory]]}
    return (stream.file_header() + stream.configuration(MACHINE_TYPE) + stream.section_full(1, "livemig/config", 0, 1)
            + stream.blob(json.dumps(cfg).encode()) + stream.section_footer(1))


def test_strangers_are_logged_and_dropped_and_the_real_source_gets_in() -> None:
    w = Waiting(timeout=1.0)
    idle = w.connect()
    w.connect().close()
    strangers = [
        w.connect(b"GET / HTTP/1.0\r\n\r\n"),
        w.connect(handshake.encode_init(bytes(16), 0)),  # wrong uuid
        w.connect(handshake.encode_init(SECRET.bytes, 5)),  # channel id beyond --multifd-channels
        w.connect(handshake.encode_init(SECRET.bytes, 0)[:4] + (9).to_bytes(4, "big") + bytes(56)),
    ]
    assert "127.0.0.1:" in w.wait_log("closed before sending anything")
    w.wait_log("not a migration channel (first bytes b'GET ', expected")
    assert "uuid differs from this destination's" in w.wait_log("multifd channel 0: the uuid differs")
    w.wait_log("multifd: channel id: received 5, expected < 2")
    w.wait_log("multifd: packet version: received 9")
    w.wait_log("sent nothing within 1 s")  # the idle one, after its first-bytes deadline
    assert w.t.is_alive()  # still waiting
    w.migrate()
    w.no_secret()
    for s in [idle, *strangers]:
        s.close()


def test_a_dribbling_stranger_is_dropped_in_bounded_time() -> None:
    """One byte every 0.6 s with --timeout 1: no byte is late, yet the greeting's deadline holds."""
    w = Waiting(timeout=1.0)
    s = w.connect()
    t0 = time.monotonic()
    dribble = threading.Thread(target=lambda: [(s.send(b"QEVM"[i:i + 1]), time.sleep(0.6)) for i in range(3)],
                               daemon=True)
    dribble.start()
    assert "sent only" in w.wait_log("within 1 s")
    assert time.monotonic() - t0 < 2.5
    w.migrate()
    dribble.join(timeout=5)
    s.close()


def test_a_main_channel_that_dribbles_its_configuration_is_dropped_in_bounded_time() -> None:
    """Header and CONFIGURATION, then livemig/config a byte per 0.3 s: not the main channel yet, so the
    greeting's deadline drops it and the destination keeps waiting."""
    w = Waiting(timeout=1.0)
    data = _config(MEM)
    s = w.connect(data[:20])
    t0 = time.monotonic()
    for b in data[20:30]:
        try:
            s.send(bytes([b]))
        except OSError:
            break
        time.sleep(0.3)
    assert "sent only" in w.wait_log("livemig/config within 1 s")
    assert time.monotonic() - t0 < 4 and w.t.is_alive()
    w.migrate()
    s.close()


def test_a_source_with_another_uuid_is_answered_refused_and_the_real_source_gets_in() -> None:
    w = Waiting(timeout=1.0)
    src = FakeGuest(GuestConfig(memory=MEM, seed=5))
    stats = Source(src, parse_address(f"tcp:127.0.0.1:{w.d.port}"), PARAMS, uuid=bytes(16), timeout=5).run()
    assert stats.status == "failed"
    assert "destination refused the migration: the uuid differs from the destination's" in stats.error
    w.wait_log("the uuid differs from the destination's")
    assert w.t.is_alive() and not w.d.gate.main_ready.is_set()
    w.migrate()
    w.no_secret()


def test_a_multifd_channel_before_the_main_channel_is_dropped() -> None:
    w = Waiting(timeout=1.0)
    early = w.connect(handshake.encode_init(SECRET.bytes, 0))  # valid, but no main channel yet
    w.wait_log("multifd channel 0 connected before a main channel was admitted")
    w.migrate()  # channel 0 is still free for the real source
    early.close()


def test_a_second_main_channel_is_refused_not_fatal() -> None:
    w = Waiting(timeout=5.0)
    src = FakeGuest(GuestConfig(memory=MEM, seed=5))
    slow = MigrationParameters(multifd_channels=2, max_bandwidth=4 << 20)
    stats: list[Any] = []
    t = threading.Thread(target=lambda: stats.append(Source(src, parse_address(f"tcp:127.0.0.1:{w.d.port}"), slow,
                                                            uuid=SECRET.bytes, timeout=5).run()))
    t.start()
    assert w.d.gate.main_ready.wait(5)
    second = w.connect(_config(MEM))
    w.wait_log("destination busy: a migration is already in progress")
    t.join(timeout=20)
    w.t.join(timeout=10)
    assert stats[0].status == "completed" and w.out["resumed"] is True
    second.close()


@pytest.mark.parametrize(("cfg", "words"), [
    (_config(384 << 20), "the source's guest needs 384.00 MiB of RAM, more than this destination's "
                         "--max-memory 64.00 MiB"),
    (_config(MEM, version=99), f"handover protocol version differs: source 99, destination {protocol.VERSION}"),
    (_config(MEM, uuid=bytes(16)), "the uuid differs from the destination's"),
])
def test_refused_configuration_allocates_nothing_and_the_destination_waits_on(cfg: bytes, words: str) -> None:
    w = Waiting(timeout=2.0, guest=False, max_memory=64 << 20)
    s = w.connect(cfg)
    answer = ReturnPath(s, "to-source", "destination").recv(5)
    assert isinstance(answer, protocol.Refused) and words in answer.error
    w.wait_log(words)
    assert w.d.guest is None and w.t.is_alive()
    s.close()
    time.sleep(0.2)
    assert w.t.is_alive()  # waiting for the next source (test_a_source_with_another_uuid... migrates one)
    w.d.cancel()
    w.t.join(timeout=10)
    assert w.d.guest is None and w.out["status"] == "failed" and w.out["resumed"] is False


def test_a_second_source_during_a_migration_is_told_the_destination_is_busy() -> None:
    w = Waiting(timeout=5.0)
    slow = MigrationParameters(multifd_channels=2, max_bandwidth=4 << 20)
    stats: list[Any] = []
    t = threading.Thread(target=lambda: stats.append(Source(FakeGuest(GuestConfig(memory=MEM, seed=5)),
                                                            parse_address(f"tcp:127.0.0.1:{w.d.port}"), slow,
                                                            uuid=SECRET.bytes, timeout=5).run()))
    t.start()
    assert w.d.gate.main_ready.wait(5)
    second = Source(FakeGuest(GuestConfig(memory=MEM, seed=6)), parse_address(f"tcp:127.0.0.1:{w.d.port}"), PARAMS,
                    uuid=SECRET.bytes, timeout=5).run()
    assert second.status == "failed"
    assert "destination busy: a migration is already in progress" in second.error
    t.join(timeout=20)
    w.t.join(timeout=10)
    assert stats[0].status == "completed" and w.out["resumed"] is True


def test_host_memory_limit_leaves_a_margin() -> None:
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 <= host_memory_limit() <= avail - (256 << 20) or host_memory_limit() == 0
