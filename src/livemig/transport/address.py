"""Migration addresses as QEMU writes them: ``tcp:HOST:PORT`` and ``unix:PATH`` (a Unix socket file)."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from dataclasses import dataclass

from ..errors import ParameterError


@dataclass(frozen=True)
class Address:
    """A parsed migration URI."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"

    @property
    def family(self) -> socket.AddressFamily:
        if self.scheme == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def with_port(self, port: int) -> Address:
        """The same address with ``port`` (a listener's real port after asking for 0); unix: unchanged."""
        return self if self.scheme == "unix" else dataclasses.replace(self, port=port)

    def sockaddr(self) -> tuple[str, int] | str:
        return self.path if self.scheme == "unix" else (self.host, self.port)


def parse_address(uri: str) -> Address:
    """Parse ``tcp:HOST:PORT`` (HOST may be ``[v6]`` or empty/``0`` for any) or ``unix:PATH``."""
    if uri.startswith("unix:"):
        path = uri[5:]
        if not path:
            raise ParameterError(f"invalid migration address '{uri}': unix: needs a path")
        return Address("unix", path=path)
    if not uri.startswith("tcp:"):
        raise ParameterError(f"invalid migration address '{uri}': expected tcp:HOST:PORT or unix:PATH")
    rest = uri[4:]
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]:")
    else:
        host, _, port_text = rest.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ParameterError(f"invalid migration address '{uri}': port '{port_text}' is not a number") from None
    if not 0 <= port <= 65535:
        raise ParameterError(f"invalid migration address '{uri}': port {port} out of range 0..65535")
    if host in ("", "0"):
        host = "0.0.0.0"
    return Address("tcp", host=host, port=port)


def claim_unix_path(path: str) -> None:
    """Make ``path`` free for a new unix-socket listener: nothing is there, or a stale socket file
    (one nobody listens on: connecting is refused), which is removed.

    Raises ParameterError naming the path when a process listens there already, or the path is not
    a socket file (never removed: it may be anyone's data).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ParameterError(f"unix:{path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(mode):
        raise ParameterError(f"unix:{path}: the file exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # a socket file its listener left behind
        os.unlink(path)
        return
    except OSError as exc:
        raise ParameterError(f"unix:{path}: cannot tell whether a process listens there: {exc.strerror}") from exc
    finally:
        probe.close()
    raise ParameterError(f"unix:{path}: a process listens on this socket already; stop it or choose another path")
