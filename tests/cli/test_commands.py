"""``livemig migrate`` and ``livemig incoming`` as a user runs them: exit statuses (0 completed, 1 failed,
2 bad option, 130 Ctrl-C), each failure printed once in words, the result always printed."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.migrate import cli

SMALL = ("--guest", "portable", "--memory", "4M")
PYTHON_NAMES = re.compile(r"Traceback|\b[A-Z]\w*(Error|Interrupt|Exception)\b|\[Errno|\[\('|\bNone\b")


def clean(text: str) -> str:
    """``text``, asserted free of Python internals and of a context said twice."""
    assert not PYTHON_NAMES.search(text), text
    assert not re.search(r"(\b[\w-]+: )\1", text), text
    return text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--local", "--timeout", "0"), "--timeout 0: expected a number of seconds 0.1 or more"),
        (("--local", "--run-after", "-3"), "--run-after -3: expected a number of seconds 0 or more"),
        (("--local", "--max-passes", "-1"), "--max-passes -1: expected a value of 0 (never) or more"),
        (("tcp:127.0.0.1:1", "--run-after", "1"), "--run-after needs --local"),
        (("--local", "tcp:127.0.0.1:1"), "--local starts its own destination, so the URI 'tcp:127.0.0.1:1'"),
        ((), "a destination is needed: a URI, tcp:HOST:PORT"),
        (("--local", "--max-bandwidth", "10gigs"), "--max-bandwidth '10gigs': expected a rate like 10Gbps"),
        (("--local", "--max-bandwidth", "10gigs"), "1GiB/s"),
        (("--local", "--memory", "1X"), "--memory '1X': expected a size like"),
        (("--local", "--memory", "5000"), "--memory 5000: expected a positive multiple of 4096 bytes"),
        (("--local", "--fill", "nope"), "--fill nope: unknown fill 'nope'"),
        (("--local", "--multifd-channels", "0"), "--multifd-channels 0: expected a value between 1 and 255"),
        (("--local", "--uuid", "x"), "--uuid 'x': expected a UUID"),
        (("--local", "--json", "/nonexistent/r.json"), "--json /nonexistent/r.json: directory /nonexistent does"),
        (("exec:cat",), "invalid migration address 'exec:cat'"),
        (("tcp:nosuchhost.invalid:4444",), "destination 'tcp:nosuchhost.invalid:4444': cannot resolve host "
                                           "'nosuchhost.invalid'"),
        (("--local", "--dump-ram", "/nonexistent/ram"), "--dump-ram /nonexistent/ram: expected a directory"),
    ],
)
def test_bad_options_refused_before_anything_starts(args: tuple[str, ...], message: str) -> None:
    r = cli("migrate", *SMALL, *args, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith("livemig migrate: error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1  # one line, printed once, before any guest or destination started
    clean(r.stderr)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tcp:127.0.0.1:0", "--timeout", "0"), "--timeout 0: expected a number of seconds 0.1 or more"),
        (("tcp:127.0.0.1:x",), "invalid migration address 'tcp:127.0.0.1:x': port 'x' is not a number"),
        (("tcp:127.0.0.1:0", "--memory", "lots"), "--memory 'lots': expected a size like"),
    ],
)
def test_incoming_bad_options(args: tuple[str, ...], message: str) -> None:
    r = cli("incoming", *args, timeout=60)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    clean(r.stderr)


def test_local_migration_prints_its_result_and_the_destinations(tmp_path: Path) -> None:
    r = cli("migrate", "--local", *SMALL, "--workload", "counter", "--multifd-channels", "1", "--run-after", "0.3")
    assert r.returncode == 0, r.stderr
    assert "Migration status: completed" in r.stdout
    assert "on 1 channel," in r.stderr  # singular
    summary = r.stdout.splitlines()[-1]
    assert re.fullmatch(r"destination: guest resumed; then ran: progress \d+ -> \d+, workload check ok", summary)
    assert "livemig: destination: listening on tcp:127.0.0.1:" in r.stderr  # relayed before the migration
    assert "livemig incoming:" not in r.stdout + r.stderr  # the child's own lines never reach the terminal raw
    clean(r.stdout + r.stderr)


def test_an_idle_guest_is_not_reported_as_a_counter_that_did_not_move() -> None:
    r = cli("migrate", "--local", *SMALL, "--run-after", "0.2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == ("destination: guest resumed; then ran: idle guest, no progress counter, "
                                         "nothing to check")


def test_quiet_hides_progress_not_the_result_and_json_dash_is_stdout() -> None:
    r = cli("migrate", "--local", *SMALL, "--quiet", "--json", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)  # stdout is the JSON alone
    assert data["status"] == "completed" and data["ram"]["total"] == 4 << 20
    assert r.stderr.startswith("Migration status: completed")  # the table, on stderr, nothing else before it
    assert not Path("-").exists()


def test_a_failed_migration_is_one_error_with_what_happened() -> None:
    s = socket.socket()  # a port nobody listens on: bound, then closed
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = cli("migrate", f"tcp:127.0.0.1:{port}", *SMALL, "--quiet")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"livemig migrate: error: migration failed: cannot connect to tcp:127.0.0.1:{port}: Connection refused",
        "livemig migrate: after 0.0 s, 0 B transferred; the source guest is running",
    ]


def test_mismatched_guests_are_refused_in_words(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--guest", "portable", "--memory", "8M"],
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(port_file)
        r = cli("migrate", f"tcp:127.0.0.1:{port_file.read_text()}", *SMALL, "--quiet")
        time.sleep(0.3)
        waiting = dst.poll() is None  # a refused source does not end the destination: it waits for another
        dst.send_signal(signal.SIGTERM)
        _, dst_err = dst.communicate(timeout=60)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    assert r.returncode == 1 and waiting and dst.returncode != 0
    want = "guest differs: source has a portable guest with RAM pc.ram 4.00 MiB, destination a portable guest " \
           "with RAM pc.ram 8.00 MiB"
    assert want in r.stderr and r.stderr.count(want) == 1, r.stderr
    assert dst_err.count(want) == 1, dst_err
    clean(r.stderr + dst_err)


def test_unix_socket_migration(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", f"unix:{sock}", *SMALL],
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock)
        r = cli("migrate", f"unix:{sock}", *SMALL)
        _, dst_err = dst.communicate(timeout=60)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    assert r.returncode == 0 and dst.returncode == 0, r.stderr + dst_err
    assert f"livemig incoming: listening on unix:{sock}\n" in dst_err
    assert f"livemig: migrating to unix:{sock} on 2 channels" in r.stderr
    assert dst_err.splitlines()[-1] == "livemig incoming: completed; guest resumed"
    assert not sock.exists()  # the listener removed its socket file: the next incoming can use the path
    clean(r.stderr + dst_err)


def test_unix_socket_path_stale_live_or_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    r = cli("incoming", f"unix:{path}", *SMALL, timeout=60)
    assert r.returncode == 2 and r.stderr == (f"livemig incoming: error: unix:{path}: a process listens on this "
                                              "socket already; stop it or choose another path\n"), r.stderr
    live.close()  # now stale: the file stays, nobody listens
    assert path.exists()
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", f"unix:{path}", *SMALL],
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the stale file replaced by a live socket
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(path))
                break
            except OSError:
                assert time.monotonic() < deadline and dst.poll() is None
                time.sleep(0.05)
            finally:
                probe.close()
        dst.send_signal(signal.SIGINT)
        _, err = dst.communicate(timeout=60)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    assert dst.returncode == 130 and not path.exists(), err
    path.write_text("not a socket")
    r = cli("incoming", f"unix:{path}", *SMALL, timeout=60)
    assert r.returncode == 2 and f"unix:{path}: the file exists and is not a socket" in r.stderr, r.stderr
    assert path.read_text() == "not a socket"
    clean(r.stderr)


def test_ctrl_c_on_a_waiting_destination(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    p = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                          str(port_file), *SMALL], stderr=subprocess.PIPE, text=True)
    _wait_for(port_file)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines()[-2:] == ["livemig incoming: interrupted",
                                     "livemig incoming: guest discarded, never run"], err
    assert "no main channel" not in err and "failed" not in err
    clean(err)


def test_ctrl_c_during_a_migration_cancels_it_and_the_guest_runs_on() -> None:
    p = subprocess.Popen([sys.executable, "-m", "livemig.cli", "migrate", "--local", "--guest", "portable",
                          "--memory", "64M", "--max-bandwidth", "8M"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    seen = []
    for line in p.stderr:
        seen.append(line)
        if line.startswith("livemig: migrating to"):
            break
    time.sleep(0.5)  # let RAM move (8 MiB/s: far from done)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, "".join(seen) + err
    lines = err.splitlines()
    assert lines[-2:-1] == ["livemig migrate: interrupted"], err
    assert re.fullmatch(r"livemig migrate: after \d+\.\d s, [\d.]+ \S+ transferred; the source guest is running",
                        lines[-1])
    assert out == ""
    clean("".join(seen) + err)


def test_help_tells_the_truth() -> None:
    migrate = cli("migrate", "--help").stdout
    incoming = cli("incoming", "--help").stdout
    flat = " ".join(incoming.split())
    assert "unix:PATH" in migrate and "unix:PATH" in flat
    assert "the source's size" in flat and "default 1G" not in flat
    assert "the result is still printed" in " ".join(migrate.split())


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.kvm
def test_incoming_without_memory_creates_the_kvm_guest_from_the_sources_config(tmp_path: Path) -> None:
    """README, "Two hosts": without --memory the destination creates the guest from the source's
    description; a KVM one is created on a connection thread, so the command installs the vCPU kick
    handler on its main thread first (it refused every source with an internal message before)."""
    sock = tmp_path / "m.sock"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", f"unix:{sock}"],
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock)
        r = cli("migrate", f"unix:{sock}", "--guest", "kvm", "--memory", "8M")
        _, dst_err = dst.communicate(timeout=60)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.wait()
    assert r.returncode == 0 and dst.returncode == 0, r.stderr + dst_err
    assert "creating the kvm guest from the source's config (8.00 MiB)" in dst_err
    assert dst_err.splitlines()[-1] == "livemig incoming: completed; guest resumed"
    clean(r.stderr + dst_err)
