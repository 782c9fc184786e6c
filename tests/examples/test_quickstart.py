"""examples/quickstart.py, the README's main command, works on a machine with no Redis configured."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from qflow import _embedded
from tests.examples.conftest import REPO_ROOT, clean_env, needs_cli, run

SCRIPT = str(REPO_ROOT / "examples" / "quickstart.py")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A project home for the embedded server; the server is stopped after the test."""
    path = tmp_path / "qhome"
    yield path
    _embedded.stop(_embedded.server_for(path))


def tally(stdout: str) -> dict[int, int]:
    return {int(pid): int(n) for pid, n in re.findall(r"pid\s+(\d+)\s+#+\s+(\d+) jobs", stdout)}


def progress(stdout: str) -> list[tuple[int, int]]:
    """(running, claimed ahead) of each progress line."""
    return [(int(r), int(a)) for r, a in re.findall(r"(\d+) running\s+(\d+) claimed ahead", stdout)]


@pytest.fixture
def quickstart_server(redis_url: str) -> Iterator[str]:
    """The test server; the quickstart's queue (``qflow:{quickstart}``) is deleted afterwards."""
    yield redis_url
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match="qflow:{quickstart}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@needs_cli
def test_quickstart_starts_the_embedded_server_then_reuses_it(home: Path, tmp_path: Path) -> None:
    """Two runs with no URL configured: the first starts the embedded server, the second attaches to it;
    each enqueues its jobs, two worker processes run them all, and the workers drain on SIGTERM."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = clean_env(QFLOW_HOME=str(home), TMPDIR=str(temp))
    first = run([SCRIPT, "--jobs", "40"], env=env, cwd=tmp_path)
    assert "started the embedded Valkey server" in first.stderr
    pid = _embedded.server_for(home).pid()
    assert pid is not None

    second = run([SCRIPT, "--jobs", "30"], env=env, cwd=tmp_path)
    assert "using the embedded Valkey server" in second.stderr
    assert _embedded.server_for(home).pid() == pid

    for done, jobs in ((first, 40), (second, 30)):
        counts = tally(done.stdout)
        assert sum(counts.values()) == jobs, done.stdout
        assert 1 <= len(counts) <= 2, done.stdout  # usually both; a fast batch may all go to the first up
        assert f"{jobs} jobs in" in done.stdout
        assert "exit code 0" in done.stdout
        assert f"log in {home / 'quickstart.log'}" in done.stdout
        assert "the embedded Valkey server keeps running" in done.stdout
        assert "stop it with `qflow server stop`" in done.stdout
    assert "supervisor" in (home / "quickstart.log").read_text()
    assert [p.name for p in temp.iterdir() if p.name.startswith("qflow-quickstart")] == []


@needs_cli
def test_quickstart_shows_running_apart_from_claimed_ahead(
    quickstart_server: str, home: Path, tmp_path: Path
) -> None:
    """With a URL: progress never shows more running than processes x concurrency, and no server to stop."""
    env = clean_env(QFLOW_REDIS_URL=quickstart_server, QFLOW_HOME=str(home))
    done = run([SCRIPT, "--jobs", "300"], env=env, cwd=tmp_path)
    assert "capacity: 2 processes x concurrency 5 = 10 jobs running at once" in done.stdout
    lines = progress(done.stdout)
    assert lines, done.stdout
    assert all(running <= 10 for running, _ in lines), done.stdout
    assert lines[-1] == (0, 0), done.stdout  # all done: nothing runs or waits in a worker any more
    assert "embedded" not in done.stdout + done.stderr
    assert (home / "quickstart.log").exists()
