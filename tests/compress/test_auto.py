"""``multifd-compression auto``: the sample, the choice from given speeds (no timing in the tests),
the link rate, the parameter checks, and whole migrations whose stream is an ordinary one of the
picked method."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import numpy as np
import pytest

from livemig.accel.sample import sample_pages
from livemig.accel.speed import Measurement, finish_time
from livemig.compress import auto
from livemig.errors import ParameterError
from livemig.guest import create_guest
from livemig.guest.base import GuestConfig
from livemig.migration.destination import Destination
from livemig.monitor import CommandTable, Session, version_info
from livemig.monitor.hmp import HMP
from livemig.params import MigrationParameters
from livemig.transport.sockets import SocketPairLink
from livemig.vm import commands
from livemig.vm.machine import VM
from support.fakeguest import FakeGuest
from support.migrate import cli, in_process

GIB = 1 << 30
INF = float("inf")


def _m(name: str, level: int | None, comp: float, dec: float) -> Measurement:
    """Speeds (RAM bytes/s, two threads at once) as a host might measure them."""
    return Measurement(name, level, "cpu: test", False, 1.0, comp / 1.5, dec / 1.5, 1 / comp, 1 / dec, comp, dec, 2)


SPEEDS = {("none", None): _m("none", None, INF, INF), ("zstd", 1): _m("zstd", 1, 500e6, 1500e6),
          ("zstd", 3): _m("zstd", 3, 150e6, 1500e6), ("qatzip", 1): _m("qatzip", 1, 400e6, 900e6)}


@pytest.fixture
def fixed_speeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host speeds above (loopback 3 GB/s with both cores), instead of measuring this host."""
    monkeypatch.setattr(auto, "candidates", lambda: list(SPEEDS))
    monkeypatch.setattr(auto, "host_speeds", lambda c, n, d: ({k: SPEEDS[k] for k in c}, 3e9))
    monkeypatch.setattr(auto, "link_rate", lambda host: (0, ""))


def _ram(kind: str, npages: int = 8192) -> memoryview:
    return memoryview(bytearray(sample_pages(npages, kind, seed=1)))


@pytest.mark.usefixtures("fixed_speeds")
@pytest.mark.parametrize(("cap", "want"), [(0, "none"), (10 * 10**9 // 8, "none"), (10**9 // 8, "zstd-1"),
                                           (10_000_000, "zstd-1")])
def test_compressible_ram_picks_by_the_link(cap: int, want: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncapped and at 10 Gbit/s the codecs cost more than the wire on one host; at 1 Gbit/s zstd-1
    finishes first; on a 10 MB/s link, where zstd-3's ratio is 1.5 % better (set here: the real gap
    depends on the zstd version), it saves under 3 %: a tie, the lower level."""
    if cap == 10_000_000:
        real = auto.guest_ratio
        monkeypatch.setattr(auto, "guest_ratio", lambda name, level, data: (
            real("zstd", 1, data) * (1.015 if level == 3 else 1) if name == "zstd" else real(name, level, data)))
    c = auto.choose([_ram("corpus")], 2 * GIB, 8, cap, same_host=True, cores=2)
    assert c.label == want, c.reason
    rows = {auto._label(r["method"], r["level"]): r for r in c.candidates}
    assert min(r["predicted-ms"] for r in rows.values()) == pytest.approx(rows[want]["predicted-ms"], rel=auto.TIE)
    assert rows["zstd-3"]["ratio"] > rows["zstd-1"]["ratio"] > 2 and rows["none"]["ratio"] == 1
    if cap == 10_000_000:
        assert rows["zstd-3"]["predicted-ms"] < rows["zstd-1"]["predicted-ms"] and rows["zstd-3"]["limit"] == "link"
        # the reason says why the pick is not the shortest prediction the others list
        best = rows["zstd-3"]["predicted-ms"] / 1000
        assert f"); a tie with zstd-3 ({best:.2f} s, within 3%), which does more codec work; others: " in c.reason
    else:
        assert "tie" not in c.reason
    assert c.cap == cap and c.cap_source == ("max-bandwidth" if cap else "")
    assert c.sample_pages == auto.SAMPLE_RUNS * auto.RUN_PAGES
    assert f"{c.label}" not in c.reason.split("others:")[1]  # the others are the other candidates
    q = c.to_json()
    assert q["method"] == c.method and q["same-host"] is True and len(q["candidates"]) == len(SPEEDS)


@pytest.mark.usefixtures("fixed_speeds")
def test_two_hosts_have_a_core_each_side() -> None:
    """At 3.5 Gbit/s none's wire takes 4.9 s for 2 GiB: zstd-1 (compress and decompress on the same
    two cores: 5.9 s) loses on one host, and wins on two (compression alone on the source's cores: 4.4 s)."""
    ram = [_ram("corpus")]
    rate = 35 * 10**8 // 8
    assert auto.choose(ram, 2 * GIB, 8, rate, same_host=True, cores=2).label == "none"
    assert auto.choose(ram, 2 * GIB, 8, rate, same_host=False, cores=2).label == "zstd-1"


@pytest.mark.usefixtures("fixed_speeds")
def test_incompressible_or_zero_ram_sends_none() -> None:
    for kind in ("random", "zero"):
        c = auto.choose([_ram(kind)], GIB, 8, 10**9 // 8, same_host=True, cores=2)
        assert c.label == "none", c.reason
    zero = auto.choose([_ram("zero")], GIB, 8, 10**9 // 8, same_host=True, cores=2)
    assert zero.zero_pages == zero.sample_pages and all(r["predicted-ms"] == 0 for r in zero.candidates)


def test_sample_spreads_over_every_block_and_counts_zero_pages() -> None:
    a = np.zeros((1000, 4096), dtype=np.uint8)
    b = np.zeros((3000, 4096), dtype=np.uint8)
    a[:, 0] = np.arange(1000) % 250 + 1  # block a: every page marked
    b[::2, 0] = 255  # block b: every other page zero
    data, seen, zeros = auto.sample_guest([memoryview(a).cast("B"), memoryview(b).cast("B")], True)
    assert seen == 256 and len(data) == (seen - zeros) * 4096
    kept = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4096)[:, 0]
    assert (kept < 255).sum() == 8 * 8  # a quarter of RAM is block a: 8 of the 32 runs
    assert 90 <= zeros <= 100 and (kept == 255).sum() == seen - zeros - 64  # about half of b's 24 runs
    all_kept, seen2, zeros2 = auto.sample_guest([memoryview(b).cast("B")], False)
    assert zeros2 == 0 and len(all_kept) == seen2 * 4096
    tiny, seen3, _ = auto.sample_guest([memoryview(a[:5]).cast("B")], True)
    assert seen3 == 5 and len(tiny) == 5 * 4096  # fewer pages than one run: every page once


def test_link_rate_reads_tbf_then_sysfs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        if argv[:2] == ["ip", "-j"]:
            return subprocess.CompletedProcess(argv, 0, '[{"dst":"10.0.0.2","dev":"eth9"}]', "")
        return subprocess.CompletedProcess(argv, 0, '[{"kind":"tbf","options":{"rate":1250000000}}]', "")

    monkeypatch.setattr(auto.subprocess, "run", run)
    assert auto.link_rate("10.0.0.2") == (1_250_000_000, "tc tbf on eth9")
    assert calls[1][-1] == "eth9"
    assert auto.link_rate(None) == (1_250_000_000, "tc tbf on lo")
    monkeypatch.setattr(auto.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 0, '[{"kind":"noqueue"}]', ""))
    assert auto.link_rate(None) == (0, "")  # lo: no tbf and no speed in sysfs


def test_finish_time_shares_the_cores_on_one_host() -> None:
    z = SPEEDS[("zstd", 1)]
    one = finish_time(z, 3e9, 1e9, 0, 8, 2, same_host=True)
    assert one.seconds == pytest.approx(1e9 / 500e6 + 1e9 / 1500e6 + 1e9 / 3e9)  # ratio 1: wire = RAM
    two = finish_time(z, 3e9, 1e9, 0, 8, 2, same_host=False)
    assert two.seconds == pytest.approx(1e9 / 500e6 + 1e9 / 3e9 / 2) and two.limit == "sender"
    # one channel: one thread per side, at the one-thread speed
    assert finish_time(z, 3e9, 1e9, 0, 1, 2, same_host=False).seconds == pytest.approx(1e9 / (500e6 / 1.5) + 1 / 6)
    link = finish_time(z, 3e9, 1e9, 100_000_000, 8, 2, same_host=True)
    assert link.limit == "link" and link.seconds == pytest.approx(10.0)


def test_auto_is_a_parameter_value_wherever_methods_are() -> None:
    p = MigrationParameters()
    p.set("multifd-compression", "auto")
    assert p.multifd_compression == "auto" and p.level() == 0
    with pytest.raises(ParameterError, match=r"does not accept value 'automatic' \(known: none, .*, auto\)"):
        p.set("multifd-compression", "automatic")
    assert p.multifd_compression == "auto"


def _run(src_params: MigrationParameters, dst_params: MigrationParameters,
         fill: str) -> tuple[Any, dict[str, Any], FakeGuest, FakeGuest]:
    cfg = GuestConfig(memory=8 << 20, seed=3)
    sg, dg = FakeGuest(cfg), FakeGuest(cfg, incoming=True)
    sg.blocks[0].pages[:] = np.frombuffer(sample_pages(2048, fill, seed=2), dtype=np.uint8).reshape(-1, 4096)
    stats, out = in_process(sg, dg, src_params, dst_params)
    return stats, out, sg, dg


@pytest.mark.usefixtures("fixed_speeds")
@pytest.mark.parametrize(("cap", "method"), [(10**9 // 8, "zstd"), (0, "none")])
def test_migration_sends_an_ordinary_stream_of_the_pick(cap: int, method: str) -> None:
    """A destination set to the picked method itself (not auto) receives the stream: every packet's
    flag and payload are that method's; with auto it takes the source's pick."""
    src = MigrationParameters(multifd_channels=4, multifd_compression="auto", max_bandwidth=cap)
    for dst_method in (method, "auto"):
        dst = MigrationParameters(multifd_channels=4, multifd_compression=dst_method)
        stats, dres, sg, dg = _run(src, dst, "corpus")
        assert stats.status == "completed", stats.error
        assert dres["status"] == "completed"
        assert np.array_equal(sg.blocks[0].pages, dg.blocks[0].pages)
        lm = stats.to_qapi()["livemig"]
        assert lm["method"] == method and lm["auto"]["method"] == method
        assert lm["level"] == (1 if method == "zstd" else None)
        assert (lm["compression-ratio"] > 2) == (method == "zstd")
        assert "picked by multifd-compression auto: predicted" in stats.table()


@pytest.mark.usefixtures("fixed_speeds")
def test_a_destination_with_another_method_refuses_the_pick() -> None:
    src = MigrationParameters(multifd_channels=2, multifd_compression="auto", max_bandwidth=10**9 // 8)
    stats, _, sg, _ = _run(src, MigrationParameters(multifd_channels=2, multifd_compression="zlib"), "corpus")
    assert stats.status == "failed" and stats.multifd_bytes == 0 and sg.running
    assert "multifd-compression differs: source uses 'zstd', destination 'zlib'" in stats.error


def test_host_speeds_are_measured_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMIG_SPEED_CACHE", "off")  # across processes: test_auto_cache.py
    calls: list[tuple[str, int | None, int]] = []

    def measure(name: str, level: int | None, data: bytes, threads: int, repeat: int) -> Measurement:
        calls.append((name, level, threads))
        return SPEEDS[(name, level)]

    monkeypatch.setattr("livemig.accel.speed.measure", measure)
    monkeypatch.setattr("livemig.accel.speed.measure_loopback",
                        lambda total, connections, tcp: type("L", (), {"all_bps": 3e9})())
    monkeypatch.setattr(auto, "_speeds", {})
    monkeypatch.setattr(auto, "_loop", {})
    monkeypatch.setattr(auto, "_origin", {})
    data = sample_pages(256, "corpus", seed=0)
    first = auto.host_speeds([("zstd", 1), ("none", None)], 2, data)
    again = auto.host_speeds([("zstd", 1), ("qatzip", 1)], 2, b"")
    assert calls == [("zstd", 1, 2), ("none", None, 2), ("qatzip", 1, 2)]
    assert first[0][("zstd", 1)] is again[0][("zstd", 1)] and first[1] == again[1] == 3e9


@pytest.mark.usefixtures("fixed_speeds")
def test_qmp_and_hmp_set_auto_and_query_migrate_says_why() -> None:
    """``migrate-set-parameters`` (QMP) on the source, ``migrate_set_parameter`` (HMP) on the
    destination; the source's ``query-migrate`` names the pick under ``livemig.auto``."""
    def machine(incoming: bool) -> tuple[VM, Session, HMP]:
        cfg = GuestConfig(kind="portable", memory=16 << 20, fill="random", workload="idle")
        vm = VM(create_guest(cfg, incoming=incoming), name="t", incoming=incoming, emit=lambda n, d=None: None,
                timeout=10)
        table = CommandTable()
        hmp = HMP(table)
        commands.register(table, vm, lambda line: hmp.run(line).output)
        session = Session(table, version_info())
        session.handle({"execute": "qmp_capabilities"})
        return vm, session, hmp

    (svm, src, _), (dvm, dst, dhmp) = machine(False), machine(True)
    try:
        def qmp(s: Session, name: str, **arguments: Any) -> Any:
            r = s.handle({"execute": name, "arguments": arguments})
            assert "error" not in r, r
            return r["return"]

        qmp(src, "migrate-set-parameters", **{"multifd-compression": "auto", "max-bandwidth": 0})
        assert dhmp.run("migrate_set_parameter multifd-compression auto").output == ""
        assert "multifd-compression: auto" in dhmp.run("info migrate_parameters").output
        dst.handle({"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:0"}})
        port = qmp(dst, "query-migrate")["socket-address"][0]["port"]
        qmp(src, "migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while qmp(src, "query-migrate").get("status") not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = qmp(src, "query-migrate")
        assert info["status"] == "completed", info
        lm = info["livemig"]
        assert lm["method"] == "none" and lm["auto"]["method"] == "none"  # random RAM: nothing to gain
        assert lm["auto"]["cap-source"] == "" and "zero; no link limit known; " in lm["auto"]["reason"]
    finally:
        svm.close()
        dvm.close()


def test_a_destination_with_auto_probes_libqatzip_where_its_noise_is_silenced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's pick may be qatzip, adopted on a connection thread where libqat's ``Cannot open
    /dev/vfio`` could not be silenced: ``livemig incoming`` printed it among its own lines. The probe
    runs when the destination is made (the command's main thread) instead, once per process."""
    calls: list[str] = []
    monkeypatch.setattr("livemig.migration.destination.hardware_probe", lambda: calls.append("probe"))
    cfg = GuestConfig(memory=8 << 20, seed=3)
    for method, want in (("zstd", []), ("auto", ["probe"])):
        calls.clear()
        Destination(SocketPairLink(), MigrationParameters(multifd_compression=method),
                    guest=FakeGuest(cfg, incoming=True), timeout=10).listener.close()
        assert calls == want


def test_local_migration_says_the_pick_on_stderr() -> None:
    """``migrate --local`` says auto's pick and why on stderr, as the remote source does (the source VM's
    own log is kept out of the way), once; the table on stdout says it too."""
    r = cli("migrate", "--local", "--guest", "portable", "--memory", "8M", "--multifd-compression", "auto",
            "--max-bandwidth", "1Gbps", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("livemig: multifd-compression auto: ") == 1, r.stderr
    assert ", predicted " in r.stderr and "picked by multifd-compression auto: predicted" in r.stdout
