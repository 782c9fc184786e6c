"""Sync (``def``) handlers keep their processor's concurrency bound, timeouts included (issue 12, item 6).

A thread cannot be interrupted: a sync handler past its timeout has its attempt recorded as timed out at the
timeout, and its lane waits for the thread to end before it runs the next job. So no more than
``concurrency`` threads of a processor ever run at once in one worker process.
"""

from __future__ import annotations

import asyncio
import threading
import time

import qflow
from qflow.testing import FAST
from tests.support import wait_until


class Gauge:
    """Threads inside the handler right now, and the most there ever were at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.entered = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.entered += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


async def test_timed_out_sync_handlers_never_run_more_threads_than_concurrency(app: qflow.App) -> None:
    """Sync jobs outliving timeout=0.15 s with concurrency=2: never over 2 threads; each fails as timeout."""
    q = app.queue("sync_timeouts")
    gauge = Gauge()

    @q.processor(concurrency=2, timeout=0.15, attempts=1)
    def slow(job: qflow.Job[int]) -> None:
        gauge.enter()
        try:
            time.sleep(0.6)  # the work: four times the timeout
        finally:
            gauge.leave()

    jobs = [await q.add("slow", i) for i in range(8)]
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 5)

        async def all_failed() -> bool:
            return all([await j.status() == qflow.State.FAILED for j in jobs])

        await wait_until(all_failed, what="every job to fail", timeout=15)
        await wait_until(
            lambda: gauge.entered == len(jobs) and gauge.now == 0, what="every thread to end", timeout=15
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert gauge.peak <= 2, f"{gauge.peak} threads of a concurrency=2 processor ran at once"
    for job in jobs:
        info = await q.get_job(job.id)
        assert info.error is not None
        assert info.error["kind"] == "timeout"


async def test_sync_handler_whose_lease_is_lost_keeps_its_lane_until_its_thread_ends(app: qflow.App) -> None:
    """A sync job cancelled by a lost lease: the next one (concurrency=1) starts only once its thread ends."""
    q = app.queue("sync_lost")
    gauge = Gauge()

    @q.processor(concurrency=1)
    def step(job: qflow.Job[float]) -> None:
        gauge.enter()
        try:
            time.sleep(job.payload)  # the work
        finally:
            gauge.leave()

    first = await q.add("step", 1.0)
    second = await q.add("step", 0.0)
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 5)
        await wait_until(lambda: gauge.entered == 1, what="the first job's thread to start", timeout=15)
        # Another delivery takes the job over: the renewal finds the lease lost and cancels the handler.
        await app.redis().hset(q.keys.tokens, first.id, b"someone-else")
        await worker.renew_leases()

        async def second_done() -> bool:
            return await second.status() == qflow.State.COMPLETED

        await wait_until(second_done, what="the second job to complete", timeout=15)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert gauge.peak == 1, "the second job's thread started while the first one's still ran"
