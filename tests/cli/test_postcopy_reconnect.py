"""``livemig migrate`` and ``livemig incoming`` in post-copy: a cut link pauses both, and they find
each other again by themselves (same address and port), with no page lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.migrate import cli
from support.relay import Relay, Tap

COMMON = ["--memory", "16M", "--multifd-channels", "1", "--postcopy-ram", "--max-postcopy-bandwidth", "1MiB/s",
          "--timeout", "10"]


def test_a_cut_link_in_postcopy_reconnects_on_the_command_line(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    dst = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--port-file",
                            str(port_file), "--run-after", "0.3", "--json", str(tmp_path / "dst.json"), *COMMON],
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert dst.poll() is None and time.monotonic() < deadline, dst.stderr.read() if dst.stderr else ""
            time.sleep(0.05)
        port = int(port_file.read_text())
        # the relay closes the main channel both ways right after the destination's Resumed (the
        # switch): post-copy has just begun, its pages trickle at 1 MiB/s
        with Relay(("127.0.0.1", port), down=Tap(cut_after=b'"resumed"')) as relay:
            proc = cli("migrate", relay.uri, "--workload", "counter", "--dirty-rate", "20000", "--max-bandwidth", "0",
                       "--downtime-limit", "1", "--postcopy-after-passes", "1", "--json", str(tmp_path / "src.json"),
                       *COMMON, timeout=180)
        _, err = dst.communicate(timeout=60)
    finally:
        if dst.poll() is None:
            dst.send_signal(signal.SIGKILL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("post-copy paused: reconnecting") == 1, proc.stderr
    assert dst.returncode == 0, err
    assert "listening again on tcp:127.0.0.1:" in err, err
    src = json.loads((tmp_path / "src.json").read_text())
    assert src["status"] == "completed" and src["livemig"]["postcopy"]["verified"] is True
    out = json.loads((tmp_path / "dst.json").read_text())
    assert out["status"] == "completed" and out["workload_check"] == "ok"  # the guest went on exactly
