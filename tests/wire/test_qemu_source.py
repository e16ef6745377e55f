"""QEMU 7.2's and 10.x's quirks, byte by byte through a real destination (no QEMU needed): a fake
QEMU source writes the main stream and one multifd channel over loopback into ``Destination``.

7.2: sync at every RAM section's EOS, zero pages and a PAGE on the main channel, a SYNC packet that
carries data, an empty packet whose next_packet_size is stale (524288, no payload) and whose ramblock
is a leftover; 10.x: MULTIFD_FLUSH markers (the EOS does not sync). Then the device sections up
to the VMDESCRIPTION, and with the return path PONG for PING and SHUT at the end.
"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.compress import create_method
from livemig.errors import WireError
from livemig.migration.destination import Destination
from livemig.migration.from_qemu import summary
from livemig.migration.multifd import RecvChannel, RecvContext
from livemig.params import MigrationParameters
from livemig.transport.address import parse_address
from livemig.wire import encode_init, encode_packet, encode_sync
from livemig.wire.stream import (
    open_return_path,
    ping,
    ram_eos,
    ram_multifd_flush,
    ram_page,
    ram_zero_page,
    section_footer,
    section_part,
)
from support.qemu_bytes import BLOCKS, PAGE, config_part, device_part, ram_end, ram_setup

RNG = np.random.default_rng(7)
DATA = {p: RNG.integers(1, 255, PAGE, dtype=np.uint8).tobytes() for p in (0, 2, 3, 4, 5)}


def stale_empty(num: int, sync: bool) -> bytes:
    """A 7.2 packet without pages: next_packet_size left at 524288 and a leftover ramblock name."""
    buf = bytearray(encode_sync(num))
    struct.pack_into(">II", buf, 8, 1 if sync else 0, 128)  # flags, pages_alloc
    struct.pack_into(">I", buf, 20, 512 * 1024)
    buf[64:70] = b"pc.ram"
    return bytes(buf)


def channel_bytes() -> bytes:
    """Channel 0: setup SYNC; pass 1: pages 0, 2, 3 then a SYNC carrying page 5; pass 2: a stale
    empty packet, then the final SYNC (stale too)."""
    out = encode_init(bytes(16), 0) + stale_empty(0, sync=True)
    offsets = [0, 2 * PAGE, 3 * PAGE]
    out += encode_packet(flags=0, packet_num=1, ramblock="pc.ram", normal=offsets, zero=[],
                         next_packet_size=3 * PAGE) + DATA[0] + DATA[2] + DATA[3]
    out += encode_packet(flags=1, packet_num=2, ramblock="pc.ram", normal=[5 * PAGE], zero=[],
                         next_packet_size=PAGE) + DATA[5]
    return out + stale_empty(3, sync=False) + stale_empty(4, sync=True)


def main_bytes(modern: bool, return_path: bool) -> bytes:
    """Pass 1 puts page 4 on the main channel; pass 2 (the END section) zeroes page 3 there, after
    the sync that landed the multifd copy of it."""
    head = config_part("pc-q35-10.0" if modern else "pc-q35-7.2")
    if return_path:
        head += open_return_path() + ping(1)
    part = (section_part(2) + ram_page("pc.ram", 4 * PAGE, DATA[4]) + (ram_multifd_flush() if modern else b"")
            + ram_eos() + section_footer(2))
    return head + ram_setup(modern) + part + ram_end(modern, ram_zero_page("pc.ram", 3 * PAGE)) + device_part()


def recv_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("modern", [False, True], ids=["7.2-eos", "10-flush"])
@pytest.mark.parametrize("return_path", [False, True], ids=["", "rp"])
def test_a_qemu_stream_lands_ram_and_names_its_devices(tmp_path: Path, modern: bool, return_path: bool) -> None:
    dst = Destination(parse_address("tcp:127.0.0.1:0"), MigrationParameters(multifd_channels=1), timeout=10,
                      dump_ram=str(tmp_path))
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(dst.run()))
    t.start()
    main = socket.create_connection(("127.0.0.1", dst.port))
    chan = socket.create_connection(("127.0.0.1", dst.port))
    chan.sendall(channel_bytes())  # QEMU opens its channels with the main one, in any order
    main.sendall(main_bytes(modern, return_path))
    answer = recv_all(main) if return_path else b""
    t.join(timeout=30)
    main.close()
    chan.close()
    assert result["status"] == "completed", result
    assert (result["resumed"], result["guest"]) == (False, "not-run")
    if return_path:
        assert answer == bytes.fromhex("0002 0004 00000001") + bytes.fromhex("0001 0004 00000000")  # PONG 1, SHUT 0
    q = result["qemu"]
    assert q["multifd-sync"].startswith("MULTIFD_FLUSH" if modern else "EOS")
    assert (q["main-zero-pages"], q["main-normal-pages"], q["return-path"]) == (1, 1, return_path)
    assert [d["name"] for d in q["devices-not-applied"]] == ["timer", "cpu", "globalstate"]
    said = summary(result)
    assert "3 device sections received, not applied" in said and "timer, cpu, globalstate" in said
    assert "guest NOT started: livemig cannot run QEMU's CPU and device state" in said
    ram = (tmp_path / "pc.ram.bin").read_bytes()
    want = bytearray(BLOCKS[0][1])
    for p in (0, 2, 4, 5):
        want[p * PAGE:(p + 1) * PAGE] = DATA[p]
    assert ram == bytes(want)  # page 3 zeroed by the main channel after its multifd copy
    assert (tmp_path / "%2From%40etc%2Facpi%2Ftables.bin").read_bytes() == bytes(BLOCKS[1][1])


def test_stale_next_packet_size_is_refused_from_a_livemig_source() -> None:
    """Only a QEMU source gets QEMU's leniency: livemig's own sources always send 0 there."""
    failures: list[BaseException] = []
    a, b = socket.socketpair()
    ctx = RecvContext(page_size=PAGE, method=create_method("none", 0, PAGE), blocks={}, views={}, received={},
                      digests={},
                      alive=lambda: True, progress=lambda n: None, sync=lambda cid: None,
                      failed=lambda exc, where: failures.append(exc))
    ch = RecvChannel(ctx, 0, b)
    ch.start()
    a.sendall(stale_empty(0, sync=False))
    a.close()
    ch.join(timeout=10)
    assert isinstance(failures[0], WireError) and "next_packet_size of an empty packet" in str(failures[0])


def test_a_failure_is_told_to_a_qemu_source_with_shut_1(tmp_path: Path) -> None:
    """A packet flagged zlib into a ``none`` destination fails the migration: QEMU hears SHUT(1) on
    its return path at once, and the result names the field."""
    dst = Destination(parse_address("tcp:127.0.0.1:0"), MigrationParameters(multifd_channels=1), timeout=10)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(dst.run()))
    t.start()
    main = socket.create_connection(("127.0.0.1", dst.port))
    chan = socket.create_connection(("127.0.0.1", dst.port))
    chan.sendall(encode_init(bytes(16), 0) + encode_packet(flags=0x02, packet_num=0, ramblock="pc.ram", normal=[0],
                                                           zero=[], next_packet_size=10) + bytes(10))
    main.sendall(config_part() + open_return_path() + ping(7) + ram_setup(False))
    answer = recv_all(main)
    t.join(timeout=30)
    main.close()
    chan.close()
    assert answer == bytes.fromhex("0002 0004 00000007") + bytes.fromhex("0001 0004 00000001")  # PONG 7, SHUT 1
    assert (result["status"], result["resumed"], result["guest"]) == ("failed", False, "not-run")
    assert "multifd channel 0, packet 0: multifd: packet compression flags: received 0x2, expected 0x0" in (
        result["error-desc"])
