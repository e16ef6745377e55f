"""A real QEMU (7.2, 10.0, 10.0 with qatzip) migrates into ``livemig incoming``: RAM lands byte-exact,
no guest starts, the device sections are named as received and not applied.

Each case starts a QEMU source with known RAM (tests/support/qemu.py), ``livemig incoming
--dump-ram DIR`` on a free port, and compares the source's RAM backing file with DIR/ram0.bin.
The matrix is kept affordable: every method x both versions at 2 channels, plus 1 and 8 channels
once; ``return-path`` on in half of the cases.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.bench.qemu_peer import idle_firmware
from livemig.migration.from_qemu import block_file
from support.qemu import Qemu, QemuBinary, find_qemu, known_ram, qemu_or_skip

pytestmark = pytest.mark.slow

#: (QEMU, method, channels, return-path, machine type: "q35" = the newest that QEMU has)
CASES = [
    ("7.2", "none", 2, False, "q35"),
    ("7.2", "zlib", 2, True, "q35"),
    ("7.2", "zstd", 2, False, "q35"),
    ("10.0", "none", 2, True, "q35"),
    ("10.0", "zlib", 2, False, "q35"),
    ("10.0", "zstd", 2, True, "q35"),
    ("7.2", "none", 1, True, "q35"),
    ("10.0", "zstd", 8, False, "q35"),
    # QEMU 10 with a 7.2 machine type syncs at every EOS and sends zero pages on the main channel
    ("10.0", "zlib", 2, False, "pc-q35-7.2"),
    ("qatzip", "qatzip", 2, True, "q35"),
]


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_leftover_destination() -> Iterator[None]:
    """A failed assertion must not leave a ``livemig incoming`` behind (it waits for a source)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def start_incoming(tmp: Path, channels: int, method: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
    """``livemig incoming tcp:127.0.0.1:0`` with its port once it listens."""
    port_file = tmp / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig.cli", "incoming", "tcp:127.0.0.1:0", "--multifd-channels", str(channels),
         "--multifd-compression", method, "--port-file", str(port_file), "--timeout", "30", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _STARTED.append(proc)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"livemig incoming did not listen: {out}{err}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"livemig incoming did not end: {out}{err}") from None
    return proc.returncode, out + err


def migrate_from(binary: QemuBinary, tmp: Path, method: str, channels: int, return_path: bool, machine: str,
                 *extra: str) -> tuple[Qemu, dict[str, Any], int, str]:
    """Run one QEMU -> livemig migration; returns the (still running) source, QEMU's final
    query-migrate, livemig's exit status and output. The caller closes the source."""
    src = Qemu(binary, loads=known_ram(), name="livemig-test-src", machine=machine).start()
    try:
        proc, port = start_incoming(tmp, channels, method, *extra)
        try:
            src.set_capabilities(multifd=True, return_path=return_path)
            params: dict[str, Any] = {"multifd_channels": channels, "multifd_compression": method,
                                      "max_bandwidth": 8 << 30}
            src.set_parameters(**params)
            src.migrate(f"tcp:127.0.0.1:{port}")
            info = src.wait_migration(timeout=180)
        finally:
            if proc.poll() is None and src.proc is not None and src.proc.poll() is not None:
                proc.kill()
        rc, output = finish(proc)
        return src, info, rc, output
    except BaseException:
        src.close()
        raise


@pytest.mark.parametrize(("kind", "method", "channels", "return_path", "machine"), CASES,
                         ids=[f"{k}-{m}-{c}ch{'-rp' if r else ''}{'' if q == 'q35' else '-' + q}"
                              for k, m, c, r, q in CASES])
def test_qemu_source_ram_lands_byte_exact(tmp_path: Path, kind: str, method: str, channels: int,
                                          return_path: bool, machine: str) -> None:
    binary = qemu_or_skip(kind)
    dump = tmp_path / "ram"
    result_file = tmp_path / "result.json"
    src, info, rc, output = migrate_from(binary, tmp_path, method, channels, return_path, machine,
                                         "--dump-ram", str(dump), "--json", str(result_file))
    try:
        assert info["status"] == "completed", (info, output)
        assert rc == 0, output
        assert (dump / "ram0.bin").read_bytes() == src.read_ram(), "guest RAM differs"
        blocks = {b["name"]: b for b in src.ramblocks()}
    finally:
        src.close()
    # the firmware block holds the -bios image; every block has its file, of its size
    assert (dump / "pc.bios.bin").read_bytes() == idle_firmware()
    for name, b in blocks.items():
        path = dump / block_file(name)
        assert path.stat().st_size == b["used"], name
    result = json.loads(result_file.read_text())
    assert (result["status"], result["resumed"], result["guest"]) == ("completed", False, "not-run")
    q = result["qemu"]
    assert q["machine-type"] == (binary.machine if machine == "q35" else machine)
    assert q["return-path"] is return_path
    legacy = binary.version < (8, 0) or machine == "pc-q35-7.2"
    assert q["multifd-sync"].startswith("EOS" if legacy else "MULTIFD_FLUSH")
    if legacy:  # zero pages on the main channel
        assert q["main-zero-pages"] > 0
    else:  # zero pages listed in the packets
        assert q["main-zero-pages"] == 0 and q["multifd-zero-pages"] > 0
    names = [d["name"] for d in q["devices-not-applied"]]
    assert {"timer", "cpu", "apic", "globalstate"} <= set(names) and q["vmdescription"]
    assert sum(d["bytes"] for d in q["devices-not-applied"]) == q["device-bytes"]
    assert "guest NOT started" in output and "not applied" in output


def test_a_destination_with_its_own_guest_refuses_a_qemu_source(tmp_path: Path) -> None:
    found = find_qemu("7.2")
    binary = found if isinstance(found, QemuBinary) else qemu_or_skip("10.0")
    proc, port = start_incoming(tmp_path, 1, "none", "--memory", "16M", "--guest", "portable")
    with Qemu(binary) as src:
        # with the return path QEMU hears that it was refused (without it, a QEMU source whose
        # stream fits the socket buffers calls itself completed: it needs no answer)
        src.set_capabilities(multifd=True, return_path=True)
        src.set_parameters(multifd_channels=1)
        src.migrate(f"tcp:127.0.0.1:{port}")
        info = src.wait_migration(timeout=60)
        assert info["status"] == "failed"
        # answered in QEMU's return-path format (SHUT 1), not with livemig's JSON Refused line
        assert "RP: Sibling indicated error 1" in src.log() and "invalid message" not in src.log(), src.log()
    time.sleep(0.5)
    assert proc.poll() is None  # a refused source is dropped and the destination waits on
    proc.terminate()
    _, output = finish(proc)
    assert "brings its own RAM blocks: start livemig incoming without --memory to receive it" in output
