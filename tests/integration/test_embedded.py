"""The embedded default server: started on first need, shared by every process of a project, durable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import qflow
from qflow import _embedded


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project home with no URL configured; its embedded server is stopped afterwards."""
    for var in ("QFLOW_REDIS_URL", "REDIS_URL", "QFLOW_EMBEDDED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QFLOW_HOME", str(tmp_path / "qhome"))
    yield tmp_path / "qhome"
    _embedded.stop(_embedded.server_for(tmp_path / "qhome"))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A project (a directory with a pyproject.toml) and a subdirectory; its server is stopped afterwards."""
    root = tmp_path.resolve() / "shop"
    (root / "src" / "shop").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "shop"\n')
    yield root
    for qflow_dir in (root / ".qflow", root / "src" / "shop" / ".qflow"):
        if qflow_dir.exists():  # the second one only if a regression started a server there
            _embedded.stop(_embedded.server_for(qflow_dir))


def _run(code: str, home: Path | None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -c code`` from ``cwd`` with no URL, and ``QFLOW_HOME`` set to ``home`` (None: unset)."""
    unset = ("QFLOW_REDIS_URL", "REDIS_URL", "QFLOW_EMBEDDED", "QFLOW_HOME")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    if home is not None:
        env["QFLOW_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


ADD = """
    import asyncio, qflow
    app = qflow.App()
    q = app.queue("emb")
    async def main():
        await q.add("x", 1, job_id="kept")
        print(await q.counts())
    asyncio.run(main())
"""


def test_no_url_starts_one_detached_server_and_later_processes_attach(home: Path) -> None:
    """The first process starts the server (and says so on stderr); the next attaches to the same one."""
    first = _run(ADD, home)
    assert first.returncode == 0, first.stderr
    assert "started the embedded Valkey server" in first.stderr
    assert "QFLOW_REDIS_URL" in first.stderr
    server = _embedded.server_for(home)
    pid = server.pid()
    assert pid is not None  # it outlived the process that started it
    second = _run(ADD, home)
    assert second.returncode == 0, second.stderr
    assert "using the embedded Valkey server" in second.stderr
    assert "'waiting': 1" in second.stdout  # same server: the idempotent job is still the only one
    assert server.pid() == pid


def test_processes_starting_at_the_same_instant_share_one_server(home: Path) -> None:
    """Four processes racing to start the server end up on a single server."""
    code = "from qflow import _embedded as e; s = e.server_for(); e.ensure_running(s); print(s.pid())"
    env = {**os.environ, "QFLOW_HOME": str(home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    pids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(pids) == 1
    assert pids == {str(_embedded.server_for(home).pid())}


def test_jobs_survive_a_server_stop_and_restart(home: Path) -> None:
    """A job added before ``stop`` is still there when the next process starts the server again (AOF)."""
    assert _run(ADD, home).returncode == 0
    server = _embedded.server_for(home)
    assert _embedded.stop(server) is True
    assert server.pid() is None
    count = _run(
        """
        import asyncio, qflow
        app = qflow.App()
        async def main():
            print((await app.queue("emb").counts())["waiting"])
        asyncio.run(main())
        """,
        home,
    )
    assert count.returncode == 0, count.stderr
    assert count.stdout.strip() == "1"
    assert "started the embedded Valkey server" in count.stderr


def test_stale_socket_and_pid_file_are_cleaned_up(home: Path) -> None:
    """Leftover socket and pid files from a crash do not stop the next start."""
    server = _embedded.server_for(home)
    home.mkdir(parents=True)
    server.pidfile.write_text("999999\n")
    server.socket.write_text("not a socket")
    assert _embedded.ensure_running(server) is True
    assert server.answers()


def test_embedded_off_and_no_url_is_a_clear_configuration_error(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With QFLOW_EMBEDDED=0 and no URL, asking for the URL names the variables to set."""
    monkeypatch.setenv("QFLOW_EMBEDDED", "0")
    with pytest.raises(qflow.ConfigurationError, match="QFLOW_REDIS_URL"):
        _ = qflow.App().url
    assert not _embedded.server_for(home).home.exists()


def test_qflow_server_status_stop_and_restart_on_next_use(home: Path) -> None:
    """`qflow server status|stop` report and stop the server; the next run restarts it, the job kept."""

    def qflow_server(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qflow", "server", *args, "--home", str(home)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert qflow_server("status").returncode == 6  # ExitCode.NOT_FOUND: nothing started yet
    assert _run(ADD, home).returncode == 0
    status = qflow_server("status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"running": true' in status.stdout
    stopped = qflow_server("stop")
    assert stopped.returncode == 0
    assert stopped.stdout.startswith("stopped")
    assert _embedded.server_for(home).pid() is None
    again = _run(ADD, home)
    assert again.returncode == 0, again.stderr
    assert "started the embedded Valkey server" in again.stderr
    assert "'waiting': 1" in again.stdout  # the job added before the stop survived it (AOF)


def test_the_project_root_and_a_subdirectory_reach_one_server(project: Path) -> None:
    """Processes run from a project's root and from its subdirectory share the server in ``<root>/.qflow``."""
    sub = project / "src" / "shop"
    why = f"in {project / '.qflow'} (project root found at {project} by its pyproject.toml)"
    first = _run(ADD, None, cwd=project)
    assert first.returncode == 0, first.stderr
    assert f"started the embedded Valkey server {why}" in first.stderr
    assert first.stderr.count("embedded Valkey server") == 1  # a plain script says it, once
    second = _run(ADD, None, cwd=sub)
    assert second.returncode == 0, second.stderr
    assert f"using the embedded Valkey server {why}" in second.stderr
    assert "'waiting': 1" in second.stdout  # the job added from the root: one server
    assert not (sub / ".qflow").exists()
    status = subprocess.run(
        [sys.executable, "-m", "qflow", "server", "status"],
        cwd=sub,
        env={k: v for k, v in os.environ.items() if k != "QFLOW_HOME"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert f"data:   {project / '.qflow'}\n" in status.stdout
    assert f"why:    project root found at {project} by its pyproject.toml\n" in status.stdout


def test_qflow_home_wins_over_the_project_root(home: Path, project: Path) -> None:
    """With ``QFLOW_HOME`` set, a process inside a project uses that directory and says why."""
    done = _run(ADD, home, cwd=project / "src")
    assert done.returncode == 0, done.stderr
    assert f"started the embedded Valkey server in {home.resolve()} (set by QFLOW_HOME)" in done.stderr
    assert _embedded.server_for(home).pid() is not None
    assert not (project / ".qflow").exists()


def test_no_project_marker_uses_the_current_directory_and_says_so(tmp_path: Path) -> None:
    """Outside any project, the server lives in ``./.qflow`` and the line says no marker was found."""
    loose = tmp_path.resolve() / "loose"
    loose.mkdir()
    if _embedded.find_project_root(loose) is not None:
        pytest.skip(f"a project marker above the temp dir: {_embedded.find_project_root(loose)}")
    try:
        done = _run(ADD, None, cwd=loose)
        assert done.returncode == 0, done.stderr
        assert f"started the embedded Valkey server in {loose / '.qflow'} (no pyproject.toml" in done.stderr
        assert f"in {loose} or above: the current directory)" in done.stderr
    finally:
        _embedded.stop(_embedded.server_for(loose / ".qflow"))
