"""SIGTERM is Ctrl-C with another exit status: ``livemig migrate --local`` cancels, says ``terminated``,
exits 143, stops its two ``livemig vm`` processes and removes its temporary directory; the VMs also die
with a ``migrate --local`` killed outright (SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livemig import cli

ARGS = ("migrate", "--local", "--guest", "portable", "--memory", "32M", "--max-bandwidth", "1MiB/s")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int, within: float) -> bool:
    """True once ``pid`` no longer runs (exited: absent or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _start_migrating() -> tuple[subprocess.Popen[str], list[int], Path]:
    """``migrate --local`` once it migrates, its two VMs' pids and their temporary directory."""
    p = subprocess.Popen([sys.executable, "-m", "livemig.cli", *ARGS], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if line.startswith("livemig: migrating to"):
            break
    vms = [c for c in _children(p.pid) if b"\0vm\0" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(vms) == 2
    argv = Path(f"/proc/{vms[0]}/cmdline").read_bytes().decode().split("\0")
    tmpdir = Path(argv[argv.index("--qmp") + 1].removeprefix("unix:").split(",")[0]).parent
    assert tmpdir.is_dir()
    return p, vms, tmpdir


def test_sigterm_cancels_stops_the_destination_and_cleans_up() -> None:
    p, vms, tmpdir = _start_migrating()
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    lines = err.splitlines()
    assert lines[-2] == "livemig migrate: terminated", err
    assert lines[-1].endswith("the source guest is running"), err
    assert "Traceback" not in err and out == ""
    assert all(_gone(vm, 10) for vm in vms), "a local VM outlived migrate --local"
    assert not tmpdir.exists()


def test_the_vms_die_with_a_killed_migrate_local() -> None:
    p, vms, tmpdir = _start_migrating()
    p.kill()
    p.communicate(timeout=60)
    assert all(_gone(vm, 20) for vm in vms), "a local VM outlived a SIGKILLed migrate --local"
    if tmpdir.exists():  # nobody left to remove it: a SIGKILLed source cannot
        for f in tmpdir.iterdir():
            f.unlink()
        os.rmdir(tmpdir)


def test_sigterm_on_a_waiting_destination(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    p = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                          str(port_file), "--guest", "portable", "--memory", "4M"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.splitlines()[-2:] == ["livemig incoming: terminated",
                                     "livemig incoming: guest discarded, never run"], err


def test_an_interrupt_before_the_command_parsed_has_the_same_prefix(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["migrate", "--local"]) == 130
    assert capsys.readouterr().err == "livemig migrate: interrupted\n"
