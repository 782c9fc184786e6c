"""examples/quickstart.py, the README's main command, works on a machine with no Redis configured."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

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


@needs_cli
def test_quickstart_starts_the_embedded_server_then_reuses_it(home: Path, tmp_path: Path) -> None:
    """Two runs with no URL configured: the first starts the embedded server, the second attaches to it;
    each enqueues its jobs, two worker processes run them all, and the workers drain on SIGTERM."""
    env = clean_env(QFLOW_HOME=str(home))
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
