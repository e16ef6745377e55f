"""Migrations over TLS, Source and Destination in one process on 127.0.0.1, the portable guest:
RAM arrives identical on 1 and 4 channels, and every refusal (plaintext either way, wrong CA either
way, wrong hostname, expired certificate either way, DN outside authz) fails before any RAM moves,
with the check named, the source guest still running and the destination still waiting or cleanly
failed. Certificates are made in the test (support.certs)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.guest import GuestConfig, create_guest
from livemig.migration.destination import Destination
from livemig.migration.source import Source
from livemig.migration.stats import MigrationStats
from livemig.params import MigrationParameters
from livemig.transport import tls as T
from livemig.transport.address import parse_address
from livemig.transport.secure import tls_connector, tls_listener
from support.certs import NOW, Ca, name

CLIENT_DN = "CN=livemig-client,O=Example"


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca()


@pytest.fixture(scope="module")
def pki(ca: Ca, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory with both ends' files (QEMU's layout), server valid for 127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    ca.server_dir(d)
    ca.client_dir(d)
    return d


def server(d: Path, authz: str | None = None) -> T.Tls:
    objs = [f"tls-creds-x509,id=s,dir={d},endpoint=server"]
    if authz is not None:
        objs.append(f"authz-simple,id=a,identity={authz.replace(',', ',,')}")
    tls = T.resolve(objs, "s", None, "a" if authz is not None else None, endpoint="server")
    assert tls is not None
    return tls


def client(d: Path, hostname: str | None = None) -> T.Tls:
    tls = T.resolve([f"tls-creds-x509,id=c,dir={d},endpoint=client"], "c", hostname, endpoint="client")
    assert tls is not None
    return tls


def migrate(src_tls: T.Tls | None, dst_tls: T.Tls | None, tmp_path: Path, channels: int = 1,
            method: str = "none") -> tuple[MigrationStats, dict[str, Any] | None, Any]:
    """One migration of a 4 MiB counting portable guest; returns (source stats, destination result
    or None while it still waits, source guest; the caller closes it)."""
    params = MigrationParameters(multifd_channels=channels, multifd_compression=method, max_bandwidth=0)
    addr = parse_address("tcp:127.0.0.1:0")
    dst = Destination(tls_listener(addr, dst_tls, channels), params, timeout=10, dump_ram=str(tmp_path / "ram"))
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()), daemon=True)
    t.start()
    guest = create_guest(GuestConfig(kind="portable", memory=4 << 20, workload="counter", fill="corpus"))
    guest.start()
    stats = Source(guest, tls_connector(addr.with_port(dst.port), src_tls), params, timeout=10,
                   dump_ram=str(tmp_path / "ram")).run()
    t.join(timeout=3 if stats.status == "failed" else 30)
    if t.is_alive():  # still waiting for a source: as a destination should, after a refused stranger
        dst.fail(RuntimeError("test over"), "test")
        t.join(timeout=10)
        assert not t.is_alive()
        if dst.guest is not None:
            dst.guest.close()
        return stats, None, guest
    if dst.guest is not None:
        dst.guest.close()
    return stats, out, guest


@pytest.mark.parametrize(("channels", "method"), [(1, "none"), (4, "zstd"), (4, "none")])
def test_ram_arrives_identical_over_tls(pki: Path, tmp_path: Path, channels: int, method: str) -> None:
    stats, dres, guest = migrate(client(pki), server(pki, authz=CLIENT_DN), tmp_path, channels, method)
    guest.close()
    assert stats.status == "completed", stats.error
    assert dres is not None and dres["status"] == "completed"
    src = np.fromfile(tmp_path / "ram" / "src-pc.ram.bin", dtype=np.uint8)
    dst = np.fromfile(tmp_path / "ram" / "dst-pc.ram.bin", dtype=np.uint8)
    assert src.size == 4 << 20 and np.array_equal(src, dst)
    assert stats.multifd_bytes > 0


def refused(stats: MigrationStats, dres: dict[str, Any] | None, guest: Any, source_words: str,
            destination_words: str) -> None:
    """Failed before RAM moved, the source saying ``source_words``; its guest runs on; the
    destination either still waited or failed naming ``destination_words``."""
    try:
        assert stats.status == "failed", stats.status
        assert source_words in stats.error, stats.error
        assert stats.multifd_bytes == 0 and stats.precopy_bytes == 0 and not stats.channels
        assert guest.running
        before = guest.progress()
        time.sleep(0.05)
        assert guest.progress() > before
    finally:
        guest.close()
    if dres is not None:
        assert dres["status"] == "failed" and not dres["resumed"]
        assert destination_words in dres["error-desc"], dres["error-desc"]


def test_plaintext_source_to_tls_destination(pki: Path, tmp_path: Path) -> None:
    stats, dres, guest = migrate(None, server(pki), tmp_path)
    refused(stats, dres, guest, "accepts TLS connections only", "it sent plaintext")


def test_tls_source_to_plaintext_destination(pki: Path, tmp_path: Path) -> None:
    stats, dres, guest = migrate(client(pki), None, tmp_path)
    refused(stats, dres, guest, "is it listening without TLS", "0x16030")


def test_server_certificate_from_another_ca(ca: Ca, pki: Path, tmp_path: Path) -> None:
    other = Ca("other CA")
    d = other.server_dir(tmp_path / "srv", trust=ca)  # trusts our client, but its own cert is foreign
    stats, dres, guest = migrate(client(pki), server(d), tmp_path)
    refused(stats, dres, guest, "not signed by our CA", "TLS")


def test_client_certificate_from_another_ca(ca: Ca, pki: Path, tmp_path: Path) -> None:
    d = Ca("other CA").client_dir(tmp_path / "cli", trust=ca)
    stats, dres, guest = migrate(client(d), server(pki), tmp_path)
    refused(stats, dres, guest, "does not know the CA of our certificate", "not signed by our CA")


def test_wrong_hostname(pki: Path, tmp_path: Path) -> None:
    stats, dres, guest = migrate(client(pki, hostname="other.example"), server(pki), tmp_path)
    refused(stats, dres, guest, "does not match the hostname", "TLS")


def test_expired_server_certificate(ca: Ca, pki: Path, tmp_path: Path) -> None:
    d = ca.server_dir(tmp_path / "srv", not_before=NOW - dt.timedelta(days=2), not_after=NOW - dt.timedelta(days=1))
    stats, dres, guest = migrate(client(pki), server(d), tmp_path)
    refused(stats, dres, guest, "its certificate has expired", "TLS")


def test_expired_client_certificate(ca: Ca, pki: Path, tmp_path: Path) -> None:
    d = ca.client_dir(tmp_path / "cli", not_before=NOW - dt.timedelta(days=2), not_after=NOW - dt.timedelta(days=1))
    stats, dres, guest = migrate(client(d), server(pki), tmp_path)
    refused(stats, dres, guest, "our certificate has expired", "its certificate has expired")


def test_dn_outside_authz(ca: Ca, pki: Path, tmp_path: Path) -> None:
    d = ca.client_dir(tmp_path / "cli", subject=name(("O", "Example"), ("CN", "intruder")))
    stats, dres, guest = migrate(client(d), server(pki, authz=CLIENT_DN), tmp_path)
    refused(stats, dres, guest, "certificate DN 'CN=intruder,O=Example' is not allowed",
            "is not the identity of authz-simple 'a'")


def _tls_pair(pki: Path) -> tuple[Any, Any]:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as lst:
        c = socket.create_connection(lst.getsockname(), timeout=10)
        s, _ = lst.accept()
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(s=T.wrap_server(s, server(pki), 10)))
    t.start()
    cs = T.wrap_client(c, client(pki), "127.0.0.1", 10)
    t.join()
    return out["s"], cs


def test_vectored_io_peek_and_shutdown_on_tls_sockets(pki: Path) -> None:
    import socket

    from livemig.errors import TransportError
    from livemig.transport.sockets import recv_exact_into, recv_into_buffers, send_buffers

    ss, cs = _tls_pair(pki)
    rng = np.random.default_rng(1)
    sizes = [4, 10, 70000, 5, 5, 200000, 3, 65535, 65536, 1]
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    data = b"".join(parts)
    t = threading.Thread(target=lambda: send_buffers(cs, [memoryview(p) for p in parts], "test"))
    t.start()
    assert ss.recv(4, socket.MSG_PEEK) == data[:4]  # classification peeks; the bytes stay for the reader
    assert ss.recv(2, socket.MSG_PEEK) == data[:2]
    got = bytearray(len(data))
    view = memoryview(got)
    cuts = [0, 3, 9000, 9001, 300000, len(data)]  # boundaries unlike the sender's
    recv_into_buffers(ss, [view[a:b] for a, b in zip(cuts, cuts[1:], strict=False)], "test")
    t.join()
    assert bytes(got) == data
    # a read blocked in one thread ends as a TransportError when another shuts the read side down
    # (as a failing destination does), and the write side still speaks TLS: the error report arrives
    err: list[BaseException] = []

    def blocked() -> None:
        try:
            recv_exact_into(ss, memoryview(bytearray(10)), "test")
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            err.append(exc)

    r = threading.Thread(target=blocked)
    r.start()
    time.sleep(0.2)
    ss.shutdown(socket.SHUT_RD)
    r.join(5)
    assert not r.is_alive() and len(err) == 1 and isinstance(err[0], TransportError), err
    send_buffers(ss, [b"failed\n"], "error report")
    assert cs.recv(7) == b"failed\n"
    ss.close()
    cs.close()


def test_a_cancel_during_ram_over_tls_aborts_and_the_destination_discards(pki: Path) -> None:
    """The Abort goes on the TLS main channel between two records; the destination discards its
    guest because of it (its 30 s timeout is far away) and the source's guest runs on."""
    params = MigrationParameters(multifd_channels=2, max_bandwidth=8 << 20)
    addr = parse_address("tcp:127.0.0.1:0")
    config = GuestConfig(kind="portable", memory=32 << 20, workload="counter", fill="random")
    dg = create_guest(config, incoming=True)
    dst = Destination(tls_listener(addr, server(pki), 2), params, guest=dg, timeout=30)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(dst.run()), daemon=True)
    t.start()
    guest = create_guest(config)
    try:
        guest.start()
        src = Source(guest, tls_connector(addr.with_port(dst.port), client(pki)), params, timeout=30)

        def cancel_mid_ram() -> None:
            while not (src.stats.status == "active" and src.channels.wire_bytes() > 1 << 20):
                time.sleep(0.005)
            src.cancel()

        threading.Thread(target=cancel_mid_ram, daemon=True).start()
        stats = src.run()
        t.join(timeout=20)
        assert stats.status == "cancelled" and guest.running and stats.multifd_bytes < 24 << 20
        assert out["handover"] == "discarded" and not out["resumed"]
        assert "the source aborted the migration: migration cancelled" in out["error-desc"], out
    finally:
        guest.close()
        dg.close()
