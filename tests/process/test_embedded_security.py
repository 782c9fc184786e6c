"""The embedded server's files are private to the user, and a socket or directory of someone else is refused.

Each test starts the server the way users do (a producer script with no URL configured, ``QFLOW_HOME`` set),
then looks at the modes on disk; the server is stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qflow import _embedded
from qflow.exceptions import ConfigurationError

ADD = """
    import asyncio, qflow
    app = qflow.App()
    q = app.queue("emb")
    async def main():
        await q.add("x", 1, job_id="kept")
        print(await q.counts())
    asyncio.run(main())
"""

FOREIGN_UID = 65534  # nobody

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file of another user")


def mode(path: Path) -> int:
    """The permission bits of ``path`` (not following a symlink)."""
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path (pytest's tmp_path can be too long for a unix socket)."""
    path = Path(tempfile.mkdtemp(prefix="qfs-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def homes() -> Iterator[list[Path]]:
    """Embedded-server homes a test used; each one's server is stopped afterwards."""
    used: list[Path] = []
    yield used
    for home in used:
        with contextlib.suppress(ConfigurationError):  # a home the test made unusable on purpose
            _embedded.stop(_embedded.server_for(home))


def run(home: Path, homes: list[Path], **env: str | None) -> subprocess.CompletedProcess[str]:
    """The ``ADD`` producer with ``QFLOW_HOME=home`` and no URL; ``env`` sets (or, with None, unsets) more."""
    homes.append(home)
    unset = {"QFLOW_REDIS_URL", "REDIS_URL", "QFLOW_EMBEDDED", "XDG_RUNTIME_DIR"}
    full = {k: v for k, v in os.environ.items() if k not in unset}
    full["QFLOW_HOME"] = str(home)
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ADD)],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def long_home(base: Path) -> Path:
    """A home too deep for ``<home>/valkey.sock`` to be a unix socket path."""
    return base / ("deep-" * 12) / ("deeper-" * 8) / "qhome"


def test_data_dir_is_0700_and_every_file_of_the_server_0600(tmp_path: Path, homes: list[Path]) -> None:
    """A fresh server: its directory 0700; AOF, log, pid and lock files 0600; the AOF directory 0700."""
    home = tmp_path / "qhome"
    done = run(home, homes)
    assert done.returncode == 0, done.stderr
    assert mode(home) == 0o700
    aof = sorted((home / "appendonlydir").iterdir())
    assert aof, "no AOF file written"
    assert mode(home / "appendonlydir") == 0o700
    for path in [*aof, home / "valkey.log", home / "valkey.pid", home / "lock"]:
        assert mode(path) == 0o600, f"{path} is {mode(path):04o}"
    assert not [p for p in home.rglob("*") if mode(p) & 0o077], "a file open to other users"


def test_an_existing_open_data_dir_and_its_files_are_made_private(tmp_path: Path, homes: list[Path]) -> None:
    """A home left 0755 with a 0644 AOF by an older version is tightened to 0700 / 0600, data kept."""
    home = tmp_path / "qhome"
    assert run(home, homes).returncode == 0
    _embedded.stop(_embedded.server_for(home))
    for path in [home, *home.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    again = run(home, homes)
    assert again.returncode == 0, again.stderr
    assert "'waiting': 1" in again.stdout  # the same data
    assert "open to other users" in again.stderr  # said, not done silently
    assert mode(home) == 0o700
    assert not [p for p in home.rglob("*") if mode(p) & 0o077], "a file open to other users"


def test_a_too_long_home_puts_the_socket_in_the_private_runtime_dir(
    tmp_path: Path, short_tmp: Path, homes: list[Path]
) -> None:
    """Socket in ``$XDG_RUNTIME_DIR/qflow`` (0700); a process without that variable finds the same server."""
    home = long_home(tmp_path)
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    done = run(home, homes, XDG_RUNTIME_DIR=str(runtime))
    assert done.returncode == 0, done.stderr
    server = _embedded.server_for(home)
    assert server.socket.parent == runtime / "qflow"
    assert mode(runtime / "qflow") == 0o700
    assert (runtime / "qflow").lstat().st_uid == os.getuid()
    assert stat.S_ISSOCK(server.socket.lstat().st_mode)
    other = run(home, homes, TMPDIR=str(short_tmp))
    assert other.returncode == 0, other.stderr
    assert "using the embedded Valkey server" in other.stderr
    assert "'waiting': 1" in other.stdout


def test_without_xdg_the_socket_goes_in_a_private_per_user_temp_dir(
    tmp_path: Path, short_tmp: Path, homes: list[Path]
) -> None:
    """With no ``XDG_RUNTIME_DIR``: ``<tmp>/qflow-<uid>``, created 0700, not a name in the shared dir."""
    home = long_home(tmp_path)
    done = run(home, homes, TMPDIR=str(short_tmp))
    assert done.returncode == 0, done.stderr
    private = short_tmp / f"qflow-{os.getuid()}"
    assert [p.name for p in short_tmp.iterdir()] == [private.name]  # nothing else in the shared temp dir
    assert mode(private) == 0o700
    assert [p.suffix for p in private.iterdir()] == [".sock"]


def test_an_open_runtime_dir_of_ours_is_made_private(
    tmp_path: Path, short_tmp: Path, homes: list[Path]
) -> None:
    """A pre-created socket directory that is ours but mode 0777 is tightened to 0700 before it is used."""
    home = long_home(tmp_path)
    (short_tmp / "run" / "qflow").mkdir(parents=True)
    os.chmod(short_tmp / "run", 0o700)
    os.chmod(short_tmp / "run" / "qflow", 0o777)
    done = run(home, homes, XDG_RUNTIME_DIR=str(short_tmp / "run"))
    assert done.returncode == 0, done.stderr
    assert mode(short_tmp / "run" / "qflow") == 0o700
    assert _embedded.server_for(home).socket.parent == short_tmp / "run" / "qflow"


def test_a_symlinked_runtime_dir_is_refused(tmp_path: Path, short_tmp: Path, homes: list[Path]) -> None:
    """``<tmp>/qflow-<uid>`` planted as a symlink (to a directory open to all) is refused, nothing started."""
    home = long_home(tmp_path)
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    (short_tmp / f"qflow-{os.getuid()}").symlink_to(elsewhere)
    done = run(home, homes, TMPDIR=str(short_tmp))
    assert done.returncode != 0
    assert "is a symbolic link: refusing to use it" in done.stderr
    assert list(elsewhere.iterdir()) == []


@as_root
def test_a_runtime_dir_of_another_user_is_refused(tmp_path: Path, short_tmp: Path, homes: list[Path]) -> None:
    """``<tmp>/qflow-<uid>`` made by another user (to catch our jobs) is refused, nothing sent there."""
    home = long_home(tmp_path)
    planted = short_tmp / f"qflow-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chown(planted, FOREIGN_UID, FOREIGN_UID)
    done = run(home, homes, TMPDIR=str(short_tmp))
    assert done.returncode != 0
    assert f"belongs to another user (uid {FOREIGN_UID}" in done.stderr
    assert list(planted.iterdir()) == []


@as_root
def test_a_server_socket_of_another_user_is_refused(short_tmp: Path, homes: list[Path]) -> None:
    """A socket of another user where the server's should be is not connected to, even if it answers PING."""
    home = short_tmp / "qhome"
    home.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(home / "valkey.sock"))
    listener.listen(8)
    os.chown(home / "valkey.sock", FOREIGN_UID, FOREIGN_UID)
    contacted: list[bytes] = []

    def impostor() -> None:
        """Answer +PONG to anything, like a server that would take the jobs."""
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    contacted.append(conn.recv(65536))
                    conn.sendall(b"+PONG\r\n")

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        done = run(home, homes)
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
    assert done.returncode != 0
    assert f"belongs to uid {FOREIGN_UID}, not to this user" in done.stderr
    assert contacted == []
    with pytest.raises(ConfigurationError, match="refusing to connect"):
        _embedded.server_for(home).answers()


@as_root
def test_an_xdg_runtime_dir_of_another_user_is_not_used(
    tmp_path: Path, short_tmp: Path, homes: list[Path]
) -> None:
    """``XDG_RUNTIME_DIR`` left pointing at another user's directory (``su``, ``sudo``) is passed over."""
    home = long_home(tmp_path)
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, FOREIGN_UID, FOREIGN_UID)
    done = run(home, homes, XDG_RUNTIME_DIR=str(theirs), TMPDIR=str(short_tmp))
    assert done.returncode == 0, done.stderr
    assert list(theirs.iterdir()) == []
    assert _embedded.server_for(home).socket.parent == short_tmp / f"qflow-{os.getuid()}"
