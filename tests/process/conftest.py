"""Fixtures for process tests: real worker subprocesses (``tests.process.ledger_app``) and their ledger.

Every child is started in its own session (a Ctrl-C in the terminal does not reach it) and is killed and
reaped in teardown, whatever the test did. Synchronisation is by polling with a deadline (``until``),
never by a bare sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import pytest

import qflow
from tests.process import ledger_app
from tests.process.fleet_app import Fleet
from tests.process.ledger_app import Ledger, read_ledger

REPO_ROOT = Path(__file__).resolve().parents[2]


async def until(
    predicate: Callable[[], bool], *, timeout: float, what: str, details: Callable[[], str] = str
) -> float:
    """Poll ``predicate`` every 10 ms until it holds; return the time it did (monotonic), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{details()}")
        await asyncio.sleep(0.01)


def report(test: str, **figures: object) -> None:
    """Print one test's figures as one JSON line (shown with ``-s`` or on failure)."""
    print(json.dumps({"test": test, **figures}))


class WorkerProcess:
    """One ``ledger_app`` worker subprocess."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, log_file: IO[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self._log_file = log_file
        self.exited_at: float | None = None
        self.signalled = False
        """True once the test sent a signal: from then on an exit is expected."""

    def send(self, sig: signal.Signals) -> float:
        """Send ``sig``; return when it was sent (monotonic)."""
        self.signalled = True
        self.popen.send_signal(sig)
        return time.monotonic()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_exit(self, timeout: float) -> int:
        """Poll until the process exits; return its exit code (``exited_at`` records when)."""
        self.exited_at = await until(
            lambda: self.popen.poll() is not None,
            timeout=timeout,
            what=f"worker {self.pid} to exit",
            details=self.log,
        )
        code = self.popen.returncode
        assert code is not None
        return code

    def kill_and_reap(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        self._log_file.close()


class Workers:
    """Starts worker subprocesses sharing one ledger directory; reads the merged ledger."""

    def __init__(self, redis_url: str, prefix: str, directory: Path) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.dir = directory
        self.started: list[WorkerProcess] = []

    def spawn(
        self,
        *,
        concurrency: int = 8,
        drain_timeout: float | None = None,
        max_sleep: float | None = None,
        url: str | None = None,
        env: Mapping[str, str] | None = None,
        expect_exit: bool = False,
    ) -> WorkerProcess:
        """Start a worker process (it may not be fetching yet: see ``start``).

        ``url`` overrides the server (e.g. a fault proxy in front of it); ``env`` adds ``ledger_app`` settings
        (a crash point, timings); ``expect_exit``: the process will end by itself (a crash point, a poison
        job), which ``until`` then does not treat as a failure.
        """
        base = dict(os.environ)
        base.update(
            {
                ledger_app.ENV_URL: url or self.redis_url,
                ledger_app.ENV_PREFIX: self.prefix,
                ledger_app.ENV_DIR: str(self.dir),
                ledger_app.ENV_CONCURRENCY: str(concurrency),
            }
        )
        if drain_timeout is not None:
            base[ledger_app.ENV_DRAIN_TIMEOUT] = str(drain_timeout)
        if max_sleep is not None:
            base[ledger_app.ENV_MAX_SLEEP] = str(max_sleep)
        base.update(env or {})
        log_path = self.dir.parent / f"worker-{len(self.started)}.log"
        log_file = log_path.open("wb")
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tests.process.ledger_app"],
                cwd=REPO_ROOT,
                env=base,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        proc = WorkerProcess(popen, log_path, log_file)
        proc.signalled = expect_exit
        self.started.append(proc)
        return proc

    async def start(
        self,
        *,
        concurrency: int = 8,
        drain_timeout: float | None = None,
        max_sleep: float | None = None,
        url: str | None = None,
        env: Mapping[str, str] | None = None,
        expect_exit: bool = False,
    ) -> WorkerProcess:
        """Start a worker process and wait until its ledger says it is fetching."""
        proc = self.spawn(
            concurrency=concurrency,
            drain_timeout=drain_timeout,
            max_sleep=max_sleep,
            url=url,
            env=env,
            expect_exit=expect_exit,
        )
        await self.until(lambda led: proc.pid in led.pids("ready"), what=f"worker {proc.pid} ready")
        return proc

    def ledger(self) -> Ledger:
        return read_ledger(self.dir)

    def logs(self) -> str:
        return "\n".join(f"--- worker {p.pid} (exit {p.popen.poll()}):\n{p.log()}" for p in self.started)

    async def until(self, predicate: Callable[[Ledger], bool], *, what: str, timeout: float = 15.0) -> float:
        """Poll the merged ledger until ``predicate`` holds; fail with the workers' logs after ``timeout``."""

        def check() -> bool:
            for p in self.started:
                if p.popen.poll() is not None and not p.signalled:
                    # A child that died on its own will never satisfy anything: fail now, with its log.
                    pytest.fail(f"worker {p.pid} exited with {p.popen.returncode}\n{self.logs()}")
            return predicate(self.ledger())

        return await until(check, timeout=timeout, what=what, details=self.logs)

    def cleanup(self) -> None:
        for p in self.started:
            p.kill_and_reap()


@pytest.fixture
def workers(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Workers]:
    """Worker subprocesses on the test server and prefix; all killed and reaped after the test."""
    directory = tmp_path / "ledger"
    directory.mkdir()
    w = Workers(redis_url, prefix, directory)
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
async def ledger_queue(redis_url: str, prefix: str) -> AsyncIterator[qflow.Queue]:
    """The producer side of ``ledger_app``: its queue, on the test server and prefix."""
    app, queue = ledger_app.build_app(redis_url, prefix)
    yield queue
    await app.close()


@pytest.fixture
def fleet(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    """Supervisors and commands on the test server and prefix; every process killed and reaped afterwards."""
    f = Fleet(redis_url, prefix, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()
