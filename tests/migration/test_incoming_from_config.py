"""``livemig incoming`` without ``--memory`` creates the guest from the source's description, on the
thread that handles the connection: a KVM guest too (its SIGUSR1 handler installed from the main thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.migrate import cli


@pytest.mark.kvm
def test_incoming_without_memory_receives_a_kvm_guest(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--multifd-channels", "1", "--timeout", "10"],
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert time.monotonic() < deadline and dst.poll() is None
            time.sleep(0.02)
        r = cli("migrate", f"tcp:127.0.0.1:{int(port_file.read_text())}", "--guest", "kvm", "--memory", "2M",
                "--multifd-channels", "1", "--timeout", "10", "--quiet", timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        _, err = dst.communicate(timeout=30)
    finally:
        if dst.poll() is None:
            os.killpg(dst.pid, signal.SIGKILL)
            dst.wait()
    assert dst.returncode == 0, err
    assert "creating the kvm guest from the source's config (2.00 MiB)" in err
    assert "completed; guest resumed" in err
