"""``livemig migrate`` / ``livemig incoming`` with QEMU's TLS options, as processes: migrations over
TLS with RAM identical, bad TLS options refused before anything starts (exit 2, the reason named),
a plaintext source refused by a TLS destination, the warning for a non-loopback plaintext listener."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.certs import Ca
from support.migrate import cli, migrate_local

SMALL = ("--guest", "portable", "--memory", "4M")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = Ca()
    ca.server_dir(d)
    ca.client_dir(d)
    return d


def creds(d: Path, endpoint: str = "client") -> tuple[str, ...]:
    return ("--object", f"tls-creds-x509,id=tls0,dir={d},endpoint={endpoint}", "--tls-creds", "tls0")


@pytest.mark.slow
@pytest.mark.parametrize("channels", ["1", "4"])
def test_local_migration_over_tls(pki: Path, tmp_path: Path, channels: str) -> None:
    migrate_local(tmp_path, 4 << 20, "--guest", "portable", "--multifd-channels", channels,
                  "--multifd-compression", "zstd", *creds(pki))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--object", "tls-creds-psk,id=p,dir=/tmp", "--tls-creds", "p"),
         "Python 3.11's ssl module has no TLS-PSK support"),
        (("--object", "tls-creds-x509,id=t,dir=/nonexistent", "--tls-creds", "t"),
         "/nonexistent/ca-cert.pem is missing"),
        (("--tls-creds", "t"), "error: --tls-creds t: no --object tls-creds-x509 with id 't'"),
        (("--object", "tls-creds-x509,id=t,dir=/tmp,endpoint=server", "--tls-creds", "t"),
         "error: --tls-creds t: the --object tls-creds-x509 't' has endpoint=server; the source needs "
         "endpoint=client"),
        (("--object", "tls-creds-x509,id=t,dir=/tmp,colour=blue", "--tls-creds", "t"),
         "error: --object tls-creds-x509,id=t,dir=/tmp,colour=blue: property 'tls-creds-x509.colour' not found"),
        (("--object", "tls-creds-x509,id=t,dir=/tmp", "--object", "tls-creds-x509,id=t,dir=/var", "--tls-creds", "t"),
         "error: --object tls-creds-x509,id=t,dir=/var: duplicate id 't'"),
        (("--object", "tls-creds-x509,id=t,dir=/nonexistent", "--tls-creds", "t"),
         "error: --tls-creds t: tls-creds-x509 't': /nonexistent/ca-cert.pem is missing"),
        (("--tls-hostname", "h"), "--tls-hostname needs --tls-creds"),
    ],
)
def test_bad_tls_options_exit_2_before_anything_starts(args: tuple[str, ...], message: str) -> None:
    r = cli("migrate", "--local", *SMALL, *args, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "container" not in r.stderr and "Expected" not in r.stderr, r.stderr
    assert "guest" not in r.stderr.split("error:")[0]  # nothing was created before the refusal


def test_tls_over_unix_socket_needs_a_hostname(pki: Path, tmp_path: Path) -> None:
    r = cli("migrate", f"unix:{tmp_path}/s", *SMALL, *creds(pki), timeout=60)
    assert r.returncode == 2 and "give --tls-hostname" in r.stderr, r.stderr


def test_local_needs_the_server_files_too(tmp_path: Path) -> None:
    Ca().client_dir(tmp_path)
    r = cli("migrate", "--local", *SMALL, *creds(tmp_path), timeout=60)
    assert r.returncode == 2 and "server-cert.pem is missing" in r.stderr, r.stderr


def incoming(tmp_path: Path, uri: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "livemig.cli", "incoming", uri, "--port-file", str(port_file),
                             *SMALL, "--timeout", "5", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc, int(port_file.read_text())


def finish(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    _, err = proc.communicate(timeout=30)
    return err


@pytest.mark.slow
def test_plaintext_source_is_refused_by_a_tls_destination(pki: Path, tmp_path: Path) -> None:
    proc, port = incoming(tmp_path, "tcp:127.0.0.1:0", *creds(pki, "server"))
    try:
        r = cli("migrate", f"tcp:127.0.0.1:{port}", *SMALL, "--workload", "counter", "--quiet", timeout=60)
    finally:
        err = finish(proc)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "accepts TLS connections only" in r.stderr and "give the source --tls-creds" in r.stderr, r.stderr
    assert "the source guest is running" in r.stderr, r.stderr
    assert "(TLS)" in err and "it sent plaintext" in err, err


@pytest.mark.parametrize(("uri", "tls", "warned"), [("tcp:0.0.0.0:0", False, True), ("tcp:127.0.0.1:0", False, False),
                                                   ("tcp:0.0.0.0:0", True, False)])
def test_warning_for_a_plaintext_listener_others_can_reach(pki: Path, tmp_path: Path, uri: str, tls: bool,
                                                           warned: bool) -> None:
    proc, _ = incoming(tmp_path, uri, *(creds(pki, "server") if tls else ()))
    time.sleep(0.2)
    err = finish(proc)
    assert ("warning: listening on" in err and "without TLS" in err) == warned, err
