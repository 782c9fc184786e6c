"""The supervisor's control socket: how ``qflow scale`` reaches a running ``qflow worker`` on this host.

Each supervisor listens on a unix socket ``qflow-<pid>.sock`` in the run directory (``QFLOW_RUN_DIR``, else
``$XDG_RUNTIME_DIR/qflow``, else ``<tmp>/qflow-<uid>``): a directory owned by this user, mode 0700 (created
so, or tightened; one that belongs to another user or is a symlink is refused). A request is one JSON line,
``{"cmd": "status"}``, ``{"cmd": "restart"}``, ``{"cmd": "scale", "n": N}`` or ``{"cmd": "scale", "delta":
K}``; the reply is one JSON line, the supervisor's status, or ``{"error": "..."}``. The supervisor serves it
from its main loop, like a signal: nothing runs in a handler.

Every request is decoded and checked here (``decode_request``: a msgspec tagged union, so types, required
fields, ranges and unknown fields or commands are all refused with a message), within a size and a time
bound, before the supervisor's handler sees it; the handler only ever gets one of ``{"cmd": "status"}``,
``{"cmd": "restart"}`` or ``{"cmd": "scale", "n": 1..MAX_PROCESSES}``. A bad request gets an error reply and
changes nothing; the supervisor and its children keep running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from .._embedded import private_dir, user_runtime_dir

__all__ = (
    "MAX_PROCESSES",
    "MAX_REQUEST",
    "ControlSocket",
    "Restart",
    "Scale",
    "Status",
    "control_request",
    "decode_request",
    "find_supervisors",
    "listen",
    "run_dir",
    "serve_one",
)

log = logging.getLogger("qflow.supervisor")

MAX_REQUEST = 65536
"""Bytes a request line may take; a longer one is refused."""
MAX_PROCESSES = 1024
"""The most worker processes a control request may ask for (``n``, or the count ``delta`` leads to)."""
REQUEST_TIMEOUT = 1.0
"""Seconds a client gets to send its whole request line: the supervisor's loop waits for nobody longer."""


class Status(msgspec.Struct, tag="status", tag_field="cmd", forbid_unknown_fields=True, frozen=True):
    """Ask for the supervisor's status (every request is answered with it)."""


class Restart(msgspec.Struct, tag="restart", tag_field="cmd", forbid_unknown_fields=True, frozen=True):
    """A rolling restart, like SIGHUP."""


class Scale(msgspec.Struct, tag="scale", tag_field="cmd", forbid_unknown_fields=True, frozen=True):
    """Run exactly ``n`` worker processes, or ``delta`` more (fewer when negative; never below 1)."""

    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_PROCESSES)] | msgspec.UnsetType = msgspec.UNSET
    delta: Annotated[int, msgspec.Meta(ge=-MAX_PROCESSES, le=MAX_PROCESSES)] | msgspec.UnsetType = (
        msgspec.UNSET
    )

    def __post_init__(self) -> None:
        if (self.n is msgspec.UNSET) == (self.delta is msgspec.UNSET):
            raise ValueError("a scale request gives exactly one of `n` (a count) and `delta` (+K or -K)")


Request = Status | Restart | Scale
COMMANDS = ("status", "scale", "restart")

_DECODER = msgspec.json.Decoder(Request)


class _Head(msgspec.Struct):
    cmd: str


_HEAD_DECODER = msgspec.json.Decoder(_Head)


class BadRequest(ValueError):
    """A control request that is not valid; its message is the reply's ``error``."""


def decode_request(data: bytes) -> Status | Restart | Scale:
    """One request line, checked: raises ``BadRequest`` naming what is wrong."""
    if len(data) > MAX_REQUEST:
        raise BadRequest(f"request too large (over {MAX_REQUEST} bytes)")
    if not data.strip():
        raise BadRequest("empty request: send one JSON object and a newline")
    try:
        return _DECODER.decode(data)
    except msgspec.DecodeError as exc:
        try:
            cmd = _HEAD_DECODER.decode(data).cmd
        except msgspec.DecodeError:
            cmd = None
        if cmd is not None and cmd not in COMMANDS:
            raise BadRequest(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})") from None
        what = f"{cmd} request" if cmd else "request"
        raise BadRequest(f"bad {what}: {exc}") from None


def listen(directory: Path) -> tuple[socket.socket, Path]:
    """Bind this process's control socket in ``directory`` (made private: ``private_dir``), non-blocking."""
    private_dir(directory, parents=True)
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
    """Accept one connection, read its request line (``REQUEST_TIMEOUT`` at most), answer it.

    Only a valid request reaches ``handle``, normalised (a ``delta`` becomes the count ``n`` it leads to);
    anything else, and an exception ``handle`` raises, is answered ``{"error": ...}``. Raises only if
    ``accept`` fails.
    """
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return
    with conn:
        try:
            reply = _answer(_read_request(conn), handle)
        except BadRequest as exc:
            log.warning("control socket: refused a request: %s", exc)
            reply = {"error": str(exc)}
        except Exception as exc:  # a bug in the handler must not take the supervisor and its children down
            log.exception("control socket: the request failed")
            reply = {"error": f"the supervisor failed to serve the request: {exc!r}"}
        with contextlib.suppress(OSError):
            conn.settimeout(REQUEST_TIMEOUT)
            conn.sendall(msgspec.json.encode(reply) + b"\n")


def _read_request(conn: socket.socket) -> bytes:
    """The first line a client sends (without its newline), within ``REQUEST_TIMEOUT`` and ``MAX_REQUEST``."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    while b"\n" not in data:
        if len(data) > MAX_REQUEST:
            raise BadRequest(f"request too large (over {MAX_REQUEST} bytes)")
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(f"request not received within {REQUEST_TIMEOUT:g}s (one JSON line expected)")
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            continue
        except OSError as exc:
            raise BadRequest(f"request not received: {exc}") from None
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _answer(data: bytes, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    req = decode_request(data)
    if isinstance(req, Status):
        return handle({"cmd": "status"})
    if isinstance(req, Restart):
        return handle({"cmd": "restart"})
    if isinstance(req.n, int):
        return handle({"cmd": "scale", "n": req.n})
    delta = 0 if isinstance(req.delta, msgspec.UnsetType) else req.delta
    desired = handle({"cmd": "status"}).get("desired")
    if not isinstance(desired, int):
        raise BadRequest("the supervisor's current count is unknown: give `n`")
    n = max(1, desired + delta)
    if n > MAX_PROCESSES:
        raise BadRequest(f"{desired} {delta:+d} is over the limit of {MAX_PROCESSES} worker processes")
    return handle({"cmd": "scale", "n": n})


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
    """Where supervisors put their control sockets: ``QFLOW_RUN_DIR``, else this user's private runtime
    directory (``$XDG_RUNTIME_DIR/qflow`` or ``<tmp>/qflow-<uid>``: ``qflow._embedded.user_runtime_dir``)."""
    explicit = os.environ.get("QFLOW_RUN_DIR")
    if explicit:
        return Path(explicit)
    return user_runtime_dir()


def control_request(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one JSON request to a supervisor's control socket and return its JSON reply (an object).

    Only a socket owned by this user is spoken to (``PermissionError`` otherwise); a reply that is not a
    JSON object raises ``ValueError``.
    """
    st = path.lstat()
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a socket of this user (uid {os.getuid()}): not connecting")
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
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError(f"the reply is not a JSON object: {data[:200]!r}")
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
