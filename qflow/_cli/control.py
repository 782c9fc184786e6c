"""The supervisor's control socket: how ``qflow scale`` reaches a running ``qflow worker`` on this host.

Each supervisor listens on a unix socket ``qflow-<pid>.sock`` in the run directory (``QFLOW_RUN_DIR``, else
``$XDG_RUNTIME_DIR/qflow``, else ``<tmp>/qflow-<uid>``, created with mode 0700). A request is one JSON line,
``{"cmd": "status" | "scale" | "restart", "n": N | "delta": K}``; the reply is one JSON line, the supervisor's
status. The supervisor serves it from its main loop, like a signal: nothing runs in a handler.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ("ControlSocket", "control_request", "find_supervisors", "listen", "run_dir", "serve_one")

_MAX_REQUEST = 65536


def listen(directory: Path) -> tuple[socket.socket, Path]:
    """Bind this process's control socket in ``directory`` (non-blocking, backlog 8)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"qflow-{os.getpid()}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(8)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, path


def serve_one(sock: socket.socket, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Accept one connection, read its JSON line (1 s at most), answer ``handle(request)``."""
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(1.0)
        data = b""
        while not data.endswith(b"\n") and len(data) < _MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(json.dumps(handle(json.loads(data or b"{}"))).encode() + b"\n")


class ControlSocket:
    """A supervisor's end: its socket listening in ``directory``; ``close()`` also removes the file."""

    def __init__(self, directory: Path) -> None:
        self.sock, self.path = listen(directory)

    def serve(self, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Answer one waiting request with ``handle`` (``serve_one``)."""
        serve_one(self.sock, handle)

    def close(self) -> None:
        """Stop listening and remove the socket's file."""
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def run_dir() -> Path:
    """Where supervisors put their control sockets: ``QFLOW_RUN_DIR``, ``$XDG_RUNTIME_DIR/qflow``, or
    ``<tmp>/qflow-<uid>``."""
    explicit = os.environ.get("QFLOW_RUN_DIR")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "qflow"
    return Path(tempfile.gettempdir()) / f"qflow-{os.getuid()}"


def control_request(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one JSON request to a supervisor's control socket and return its JSON reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def find_supervisors(directory: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every live supervisor on this host with its status; sockets of dead ones are removed."""
    directory = directory or run_dir()
    found = []
    for path in sorted(directory.glob("qflow-*.sock")):
        try:
            found.append((path, control_request(path, {"cmd": "status"}, timeout=2.0)))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError, ValueError):
                pid = int(path.stem.removeprefix("qflow-"))
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    path.unlink()
        except (OSError, ValueError):
            continue
    return found
