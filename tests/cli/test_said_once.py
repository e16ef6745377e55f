"""A destination failure is said once by ``livemig incoming``, without a ``destination:`` context (it is
the destination), the discarded guest as its note; the unknown outcome's exit status is documented."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.migrate import cli

SLOW = ("--guest", "portable", "--memory", "64M", "--max-bandwidth", "8M")  # far from done after 1 s


def _mid_migration(tmp_path: Path) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """An incoming and a migrate to it, returned once RAM moves."""
    port_file = tmp_path / "port"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert time.monotonic() < deadline and dst.poll() is None
        time.sleep(0.02)
    src = subprocess.Popen([sys.executable, "-m", "livemig.cli", "migrate", f"tcp:127.0.0.1:{port_file.read_text()}",
                            *SLOW], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert src.stderr is not None
    for line in src.stderr:
        if line.startswith("livemig: migrating to"):
            break
    time.sleep(1.0)
    return dst, src


@pytest.mark.parametrize("how", ["source killed", "ctrl-c"])
def test_a_destination_failure_is_said_once(tmp_path: Path, how: str) -> None:
    dst, src = _mid_migration(tmp_path)
    try:
        if how == "source killed":
            src.kill()
        else:
            dst.send_signal(signal.SIGINT)
        _, err = dst.communicate(timeout=60)
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
            p.communicate()
    lines = err.splitlines()
    assert "destination:" not in err, err
    assert err.count("never run") == 1 and lines[-1] == "livemig incoming: guest discarded, never run"
    if how == "source killed":
        assert dst.returncode == 1, err
        failure = [line for line in lines if "connection closed" in line or "channel closed" in line]
        assert len(failure) == 1 and failure[0].startswith("livemig incoming: error: migration failed: "), err
    else:
        assert dst.returncode == 130, err
        assert err.count("interrupted") == 1 and lines[-2] == "livemig incoming: interrupted", err


def test_the_unknown_outcome_has_its_own_exit_status() -> None:
    text = " ".join(cli("migrate", "--help").stdout.split())
    assert "3 outcome unknown" in text and "exit with status 3" in text
    assert "resume the source guest" not in text
