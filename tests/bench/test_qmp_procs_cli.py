"""The QMP connection (qemu.qmp) against a scripted server, process-group cleanup, bench options."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ConnectError

from livemig.bench import cli as bench_cli
from livemig.bench.model import BenchError, Run
from livemig.bench.procs import Children, descendants
from livemig.bench.qemu_peer import QmpConnection
from support.benchrows import bench_args


def _serve(path: str, script: list[tuple[str, list[dict[str, Any]]]], seen: list[dict[str, Any]]) -> threading.Thread:
    """A QMP server: greeting, then for each expected command, the listed replies (events first).

    Commands arrive as a stream of JSON objects (qemu.qmp sends no separator), replies go out as lines.
    """
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    decoder = json.JSONDecoder()

    def run() -> None:
        conn, _ = srv.accept()
        conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},'
                     b' "capabilities": []}}\r\n')  # fmt: skip
        buf = ""
        for name, replies in script:
            while True:
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                    buf = buf.lstrip()[end:]
                    break
                except ValueError:
                    buf += conn.recv(65536).decode()
            seen.append(msg)
            assert msg["execute"] == name
            out = b""
            for r in replies:
                r = dict(r)
                if "event" not in r and "id" in msg:
                    r["id"] = msg["id"]
                out += json.dumps(r).encode() + b"\r\n"
            conn.sendall(out)
        conn.recv(1)  # until the client hangs up
        conn.close()
        srv.close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def test_qmp_connection_commands_and_errors(tmp_path: Path) -> None:
    path = str(tmp_path / "qmp.sock")
    seen: list[dict[str, Any]] = []
    th = _serve(
        path,
        [
            ("qmp_capabilities", [{"return": {}}]),
            ("migrate-set-parameters", [{"return": {}}]),
            ("query-migrate", [{"event": "MIGRATION", "data": {"status": "active"},
                                "timestamp": {"seconds": 1, "microseconds": 0}},
                               {"return": {"status": "active", "ram": {"transferred": 42}}}]),
            ("migrate", [{"error": {"class": "GenericError", "desc": "There's a migration process in progress"}}]),
        ],
        seen,
    )  # fmt: skip
    c = QmpConnection.connect(path, "the test QEMU", timeout=5)
    assert c.execute("migrate-set-parameters", {"multifd-channels": 8}) == {}
    assert c.execute("query-migrate")["ram"]["transferred"] == 42
    with pytest.raises(BenchError, match="migrate .*tcp:1.2.3.4:5.* on the test QEMU failed: GenericError: There's a"):
        c.execute("migrate", {"uri": "tcp:1.2.3.4:5"})
    c.close()
    th.join(5)
    assert [m["execute"] for m in seen] == ["qmp_capabilities", "migrate-set-parameters", "query-migrate", "migrate"]
    assert seen[1]["arguments"] == {"multifd-channels": 8}
    assert len({m["id"] for m in seen[1:]}) == 3  # one id per command after the negotiation


def test_qmp_connection_rejects_a_non_qmp_server(tmp_path: Path) -> None:
    path = str(tmp_path / "x.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b"hello\r\n")
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    with pytest.raises(BenchError, match="cannot connect to the test QEMU's QMP socket .*x.sock within 1 s") as info:
        QmpConnection.connect(path, "the test QEMU", timeout=1)
    assert isinstance(info.value.__cause__, ConnectError)  # qemu.qmp's own error is kept
    srv.close()


def test_qmp_connect_times_out_without_server(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="cannot connect to the test QEMU's QMP socket"):
        QmpConnection.connect(str(tmp_path / "none.sock"), "the test QEMU", timeout=0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_children_stop_kills_descendants_in_other_sessions() -> None:
    with Children() as ch:
        # the grandchild moves to its own session, as livemig's local destination does
        p = ch.spawn(["sh", "-c", "setsid sleep 60 & sleep 60"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while len(descendants(p.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        tree = descendants(p.pid)
        assert len(tree) >= 2
    assert not _alive(p.pid)
    assert not any(_alive(pid) for pid in tree)


def test_bench_defaults_match_the_document() -> None:
    a = bench_args()
    assert a.methods == "qatzip,zstd,none" and a.multifd_channels == 8 and a.bandwidth == "10Gbps"
    assert a.workload == "idle" and a.fill == "corpus" and a.repeat == 1 and a.func is bench_cli.main


ACCEPTED = "(accepted: none, zlib, zstd, qatzip, qpl, uadk, auto)"


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"methods": "lz4"}, f"--methods: unknown method(s) 'lz4' {ACCEPTED}"),
        ({"methods": "zstd,lz4,xz"}, f"--methods: unknown method(s) 'lz4', 'xz' {ACCEPTED}"),
        ({"methods": ","}, "--methods: empty list"),
        ({"bandwidth": "fast"}, "--bandwidth: 'fast' is not a rate such as 1Gbps, 10Gbps, 500MiB/s, or 0 for uncapped"),
        ({"bandwidth": "1Gbps,,"}, "--bandwidth: empty item in '1Gbps,,' (give items separated by single commas)"),
        ({"memory": "12345"}, "--memory 12345: expected a multiple of 4096 bytes of at least 2.00 MiB"),
        ({"memory": "1M"}, "--memory 1M: expected a multiple of 4096 bytes of at least 2.00 MiB"),
        ({"memory": "2X"}, "--memory '2X': expected a size like 4096, 512M"),
        ({"sample": "lots"}, "--sample 'lots': expected a size like"),
        ({"multifd_channels": 0}, "--multifd-channels: Parameter 'multifd_channels' expects a value between 1 and 255"),
        ({"memory_table": True, "multifd_channels": 256}, "--multifd-channels: Parameter 'multifd_channels'"),
        ({"repeat": 0}, "--repeat 0: expected a number of runs 1 or more"),
        ({"smp": 0}, "--smp 0: expected a number of vCPUs 1 or more"),
        ({"level": 21, "methods": "zstd"}, "--level: Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
        ({"level": 0, "methods": "none,qatzip"}, "--level: Parameter 'multifd_qatzip_level' expects a value between 1"),
        ({"downtime_limit": -5}, "--downtime-limit: Parameter 'downtime_limit' expects an integer in the range"),
        ({"fill": "bogus"}, "--fill: unknown fill 'bogus' (expected one of: zero, random, corpus, files:DIR"),
        ({"corpus": "/nonexistent/dir"}, "--corpus: '/nonexistent/dir' is not a directory"),
        ({"json": "/nonexistent/dir/b.json"}, "--json /nonexistent/dir/b.json: directory /nonexistent/dir does"),
        ({"fill": "files:/nonexistent/dir"}, "--fill: fill files:/nonexistent/dir: not a directory"),
        ({"plot": "/etc/hostname/plots"}, "--plot /etc/hostname/plots: directory /etc/hostname does not exist"),
        ({"plot": "/nonexistent/a/b"}, "--plot /nonexistent/a/b: directory /nonexistent/a does not exist"),
    ],
)
def test_bad_options_exit_2_before_anything_runs(
    kw: dict[str, Any], msg: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[Any] = []

    def run_bench(config: Any, children: Any, measured: Any = None) -> None:
        ran.append(config)
        raise KeyboardInterrupt  # stop here: main() returns 130

    monkeypatch.setattr(bench_cli, "run_bench", run_bench)
    code = bench_cli.main(bench_args(**kw))
    if msg is None:
        assert code == 130 and ran[0].bandwidths == (125_000_000,)
        return
    err = capsys.readouterr().err
    assert code == 2 and not ran
    assert err.startswith("livemig bench: error: ") and msg in err and err.count("\n") == 1


def test_bench_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="livemig")
    bench_cli.add_commands(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    text = capsys.readouterr().out
    assert "Exit status: 0 when every attempted run succeeded" in text and "2 on a bad" in text
    for markup in ("``", ":mod:", ":class:", ":func:", "/work/", "/home/", "%%"):
        assert markup not in text
    assert "none, zlib, zstd, qatzip, qpl, uadk" in text  # the accepted methods


def test_unavailable_method_and_peer_are_na_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from livemig.bench import config

    started: list[str] = []
    monkeypatch.setattr(bench_cli, "run_livemig", lambda *a, **k: started.append(a[2]) or Run("livemig", a[2], 8, 0))
    monkeypatch.setattr(config, "available_methods", lambda: {"uadk": "no UADK device here"})
    monkeypatch.setattr("livemig.bench.qemu_peer.shutil.which", lambda name: None)
    out = tmp_path / "b.json"
    code = bench_cli.main(
        bench_args(methods="uadk", memory="16M", sample="1M", peer="qemu", no_netns=True, json=str(out),
                   guest="portable")
    )
    text = capsys.readouterr().out
    assert code == 0 and started == []  # nothing ran
    assert re.search(r"^\|uadk livemig *\|n/a: no UADK device here", text, re.M)
    assert re.search(r"^\|uadk QEMU *\|n/a: no qemu-system-x86_64; install qemu-system-x86", text, re.M)
    assert "Peer: QEMU n/a: no qemu-system-x86_64" in text
    doc = json.loads(out.read_text())
    assert doc["runs"][0]["na"] == "no UADK device here" and doc["runs"][1]["peer"] == "qemu"
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"livemig-bench-{os.getpid()}-")]


def test_missing_kvm_makes_kvm_rows_na(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("livemig.guest.kvm_unavailable", lambda: "/dev/kvm: No such file or directory")
    monkeypatch.setattr(bench_cli, "run_livemig", lambda *a, **k: pytest.fail("no run may start"))
    code = bench_cli.main(bench_args(methods="zstd,none", memory="16M", sample="1M", no_netns=True, guest="kvm"))
    text = capsys.readouterr().out
    assert code == 0
    for m in ("zstd", "none"):
        assert re.search(rf"^\|{m} *\|n/a: kvm guest: /dev/kvm: No such file or directory", text, re.M)


def test_idle_firmware_halts_at_the_reset_vector() -> None:
    from livemig.bench.qemu_peer import idle_firmware

    image = idle_firmware()
    assert len(image) == 65536  # QEMU wants a multiple of 64 KiB
    assert image[0xFFF0:0xFFF3] == b"\xf4\xeb\xfd"  # hlt; jmp back to the hlt
    assert set(image) == {0xF4, 0xEB, 0xFD}


def test_migrate_argv_carries_the_experiment() -> None:
    from livemig.bench.runner import Experiment, migrate_argv

    exp = Experiment("portable", 1 << 30, "dirty", "files:/data", smp=2, level=3, downtime_limit=50)
    argv = migrate_argv(exp, "zstd", 4, 125_000_000, "/tmp/r.json")
    i = argv.index("migrate")
    opts = dict(zip(argv[i + 2 :: 2], argv[i + 3 :: 2], strict=False))
    assert argv[i + 1] == "--local"
    assert opts["--guest"] == "portable" and opts["--memory"] == str(1 << 30) and opts["--smp"] == "2"
    assert opts["--workload"] == "dirty" and opts["--fill"] == "files:/data"
    assert opts["--multifd-channels"] == "4" and opts["--multifd-compression"] == "zstd"
    assert opts["--max-bandwidth"] == "125000000" and opts["--json"] == "/tmp/r.json"
    assert argv[argv.index("--multifd-zstd-level") + 1] == "3"
    assert argv[argv.index("--downtime-limit") + 1] == "50"
    assert "--multifd-zstd-level" not in migrate_argv(exp, "none", 4, 0, "x")


@pytest.mark.parametrize(
    "script,expect",
    [
        # the engine wrote a failed result: its error-desc is the row's error
        ("json.dump({'status': 'failed', 'error-desc': 'channel 3: connection reset'}, open(path, 'w')); "
         "sys.exit(1)", "status failed: channel 3: connection reset"),
        # no result at all: the exit status and the last stderr line
        ("sys.stderr.write('Traceback...\\nValueError: boom\\n'); sys.exit(3)",
         "exit status 3: Traceback... / ValueError: boom"),
    ],
)  # fmt: skip
def test_failed_run_carries_its_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str, expect: str
) -> None:
    from livemig.bench import runner

    fake = f"import json, sys; path = sys.argv[sys.argv.index('--json') + 1]; {script}"
    monkeypatch.setattr(runner, "LIVEMIG", [sys.executable, "-c", fake])
    exp = runner.Experiment("portable", 1 << 20, "idle", "zero", timeout=30)
    with Children() as ch:
        run = runner.run_livemig(ch, exp, "zstd", 2, 0, 0, str(tmp_path), None)
    assert run.error == expect and not run.ok


def test_data_sample_spans_the_fill(tmp_path: Path) -> None:
    from livemig.bench.data import sample_data

    for i, name in enumerate("abcd"):
        (tmp_path / name).write_bytes(bytes([65 + i]) * (4 << 20))  # four 4 MiB files: A.., B.., C.., D..
    head = sample_data(f"files:{tmp_path}", 2 << 20)  # no RAM size: the first 2 MiB only
    assert set(head) == {65}
    spread = sample_data(f"files:{tmp_path}", 2 << 20, memory=16 << 20, span=16 << 20)
    assert len(spread) == 2 << 20 and set(spread) == {65, 68}  # first and last MiB of the 16 MiB
    spread4 = sample_data(f"files:{tmp_path}", 4 << 20, memory=16 << 20, span=16 << 20)
    assert set(spread4) == {65, 66, 67, 68}
