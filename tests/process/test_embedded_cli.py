"""``qflow worker`` on the embedded server: one line says which server, however many processes it runs.

Each test builds a project in a temp dir (a ``pyproject.toml`` and a ``tasks.py``), runs the real CLI there
with no URL configured, and stops the project's embedded server afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from qflow import _embedded
from tests.process.conftest import until

TASKS = """
import qflow

app = qflow.App()
work = app.queue("work")


@work.processor(concurrency=2)
async def echo(job: qflow.Job[int]) -> int:
    return job.payload
"""

LINE = "embedded Valkey server"


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A project: ``tasks.py`` at its root, a ``scripts/`` subdirectory; its server is stopped afterwards."""
    root = tmp_path.resolve() / "shop"
    (root / "scripts").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "shop"\n')
    (root / "tasks.py").write_text(textwrap.dedent(TASKS))
    yield root
    if (root / ".qflow").exists():
        _embedded.stop(_embedded.server_for(root / ".qflow"))


def _env() -> dict[str, str]:
    """This environment without any URL or ``QFLOW_HOME``: the embedded server is found from the cwd."""
    unset = ("QFLOW_REDIS_URL", "REDIS_URL", "QFLOW_EMBEDDED", "QFLOW_HOME")
    return {k: v for k, v in os.environ.items() if k not in unset}


def _script(cwd: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (awaits on ``app``, a bare ``qflow.App()``) as a producer script from ``cwd``."""
    code = "import asyncio, qflow\nasync def main():\n    async with qflow.App() as app:\n"
    code += textwrap.indent(textwrap.dedent(body), " " * 8) + "\nasyncio.run(main())\n"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _start_worker(project: Path, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``qflow worker tasks:app ARGS`` from the project root, in its own session, logging to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qflow", "worker", "tasks:app", *args],
            cwd=project,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_worker_p2_says_which_server_once_for_the_whole_command(project: Path) -> None:
    """``qflow worker -p 2`` prints the embedded-server line once, not once per worker process."""
    produced = _script(project / "scripts", 'for i in range(20):\n    await app.queue("work").add("echo", i)')
    assert produced.returncode == 0, produced.stderr
    assert f"started the {LINE} in {project / '.qflow'} (project root found at {project}" in produced.stderr
    done = subprocess.run(
        [sys.executable, "-m", "qflow", "worker", "tasks:app", "-p", "2", "--burst"],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    assert "started worker-2" in done.stderr, done.stderr  # two processes did resolve the URL
    assert done.stderr.count(LINE) == 1, done.stderr
    assert f"using the {LINE} in {project / '.qflow'} (project root found at {project}" in done.stderr
    counted = _script(project / "scripts", 'print((await app.queue("work").counts())["completed"])')
    assert counted.stdout.strip() == "20", counted.stderr


async def test_rolling_restart_does_not_repeat_the_line(project: Path, tmp_path: Path) -> None:
    """Workers started later by the same command (SIGHUP's rolling restart) attach without a new line."""
    log_path = tmp_path / "worker.log"
    sup = _start_worker(project, log_path, "-p", "2")

    def text() -> str:
        return log_path.read_text(errors="replace")

    try:
        await until(lambda: text().count(" ready in ") == 2, timeout=30, what="2 workers ready", details=text)
        sup.send_signal(signal.SIGHUP)
        await until(
            lambda: "rolling restart done" in text(), timeout=30, what="rolling restart", details=text
        )
        await until(
            lambda: text().count(" ready in ") == 4, timeout=30, what="2 new workers ready", details=text
        )
        sup.send_signal(signal.SIGTERM)
        await until(lambda: sup.poll() is not None, timeout=30, what="the supervisor to exit", details=text)
        assert sup.returncode == 0, text()
        assert "started worker-4" in text()
        assert text().count(LINE) == 1, text()  # worker-1 started the server and said so; no one else
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.wait(timeout=10)
