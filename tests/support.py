"""Helpers shared by the integration tests: polling with a deadline, and a worker run for a block."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable

import qflow


async def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float = 10.0,
    what: str = "the condition",
    worker: asyncio.Task[None] | None = None,
) -> None:
    """Poll ``predicate`` (sync or async) every 10 ms until true; fail naming ``what`` after ``timeout``
    seconds, or at once if the ``worker`` task ended (a worker that died will never make it true)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if worker is not None and worker.done():
            raise AssertionError(f"the worker ended while waiting for {what}: {worker}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclasses.dataclass(frozen=True)
class Running:
    """A worker run by ``running`` and the task that runs it."""

    worker: qflow.Worker
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running(
    worker: qflow.Worker, *, ready_timeout: float = 5.0, stop_timeout: float = 15.0
) -> AsyncIterator[Running]:
    """Run ``worker`` in a task for the body of the block; stop it gracefully and wait for it after."""
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), ready_timeout)
    try:
        yield Running(worker, task)
    finally:
        worker.stop()
        await asyncio.wait_for(task, stop_timeout)
