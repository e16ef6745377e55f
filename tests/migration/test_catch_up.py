"""The destination answers a PING only once everything before it landed (protocol 5): what the source
waits for after each pass, so that the pause never finds the destination behind."""

from __future__ import annotations

import socket

import numpy as np

from livemig.migration import protocol
from livemig.migration.protocol import SECTION_RAM
from livemig.params import MigrationParameters
from livemig.wire import handshake, packet, stream
from migration.test_bad_peer import MEM, _destination, _hello


def test_pong_comes_after_every_channel_page_before_the_ping_landed() -> None:
    params = MigrationParameters(multifd_channels=2, max_bandwidth=0)
    d, g, out, t = _destination(params)
    main, rp = _hello(d.port, params)
    main.sendall(stream.section_start(SECTION_RAM, "ram", 0, 4) + stream.ram_mem_size([("pc.ram", MEM)]))
    chans = [socket.create_connection(("127.0.0.1", d.port)) for _ in range(2)]
    rng = np.random.default_rng(5)
    pages = {0: [3, 4, 5], 1: [200, 201]}
    data = {cid: rng.integers(1, 256, size=len(idx) * 4096, dtype=np.uint8).tobytes() for cid, idx in pages.items()}
    try:
        for cid, ch in enumerate(chans):
            ch.sendall(handshake.encode_init(bytes(16), cid))
        # the main stream's flush and PING go first: the destination must not answer before the
        # channels' pages, sent afterwards, landed
        main.sendall(stream.ram_multifd_flush() + stream.ram_eos() + stream.section_footer(SECTION_RAM)
                     + stream.ping(7))
        for cid, ch in enumerate(chans):
            offsets = np.array(pages[cid], np.uint64) * 4096
            hdr = packet.encode_packet(flags=0, packet_num=cid, ramblock="pc.ram", normal=offsets,
                                       zero=np.array([], np.uint64), next_packet_size=len(data[cid]))
            ch.sendall(hdr + data[cid] + packet.encode_sync(10 + cid))
        assert rp.recv(10) == protocol.Pong(7)
        ram = g.blocks[0].pages
        for cid, idx in pages.items():
            assert ram[idx].tobytes() == data[cid]
        assert not ram[6:200].any()
    finally:
        for ch in chans:
            ch.close()
        main.close()
        t.join(timeout=15)
