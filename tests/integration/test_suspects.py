"""A job recovered after a crash (a *suspect*, ``stalls > 0``) runs alone in its worker (issue 12, item 3).

In process, against a real server: a job is claimed by a "dead worker" with a long lease, and the test makes
that lease run out at a chosen moment (its deadline set to 0), so the worker's own recovery brings the job
back with one stall while other jobs are running. The process test with a real SIGKILL is
tests/process/test_poison.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

import qflow
from qflow._broker import scripts
from qflow.testing import FAST
from tests.support import wait_until


class Runs:
    """What ran: events in order, the jobs running now, and what ran beside the suspect when it started."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.beside_suspect: set[str] | None = None

    def start(self, name: str) -> None:
        self.events.append(("start", name))
        self.running.add(name)

    def end(self, name: str) -> None:
        self.events.append(("end", name))
        self.running.discard(name)

    def at(self, event: str, name: str) -> int:
        return self.events.index((event, name))


def held(caplog: pytest.LogCaptureFixture) -> bool:
    """True once the worker logged that it holds a recovered job to run alone."""
    return "runs alone in this process" in caplog.text


async def dead_claim(q: qflow.Queue, job: qflow.Job[None]) -> None:
    """Claim ``job`` (alone in its queue) like a worker that then dies, with a lease that lasts a minute."""
    res = await scripts.claim(q.app.redis(), q.keys, count=10, lease_ms=60_000, promote_limit=100)
    assert [c.id.decode() for c in res.jobs] == [job.id]


@pytest.mark.parametrize("layout", ["one_queue", "two_queues"])
async def test_a_recovered_job_waits_for_the_jobs_in_flight_and_runs_alone(
    app: qflow.App, caplog: pytest.LogCaptureFixture, layout: str
) -> None:
    """A suspect starts only after the jobs in flight end, with none beside it; jobs added meanwhile wait."""
    qa = app.queue("healthy")
    qs = qa if layout == "one_queue" else app.queue("suspects")
    runs = Runs()
    release_a = asyncio.Event()

    @qa.processor(concurrency=4)
    async def work(job: qflow.Job[str]) -> None:
        runs.start(job.payload)
        if job.payload.startswith("a"):
            await release_a.wait()
        runs.end(job.payload)

    @qs.processor(concurrency=4)
    async def recovered(job: qflow.Job[None]) -> None:
        runs.beside_suspect = set(runs.running)
        runs.start("s")
        runs.end("s")

    suspect = await qs.add("recovered")
    await dead_claim(qs, suspect)
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    try:
        with caplog.at_level(logging.INFO, logger="qflow"):
            await asyncio.wait_for(worker.ready.wait(), 5)
            a_jobs = [await qa.add("work", f"a{i}") for i in range(2)]
            await wait_until(lambda: {"a0", "a1"} <= runs.running, what="a0 and a1 to run")
            # The dead worker's lease runs out now: the worker's recovery requeues the job with one stall.
            await app.redis().zadd(qs.keys.active, {suspect.id: 0})
            await wait_until(lambda: held(caplog) or ("start", "s") in runs.events, what="the recovered job")
            b_jobs = [await qa.add("work", f"b{i}") for i in range(2)]
            release_a.set()
            jobs = [suspect, *a_jobs, *b_jobs]

            async def all_completed() -> bool:
                return all([await j.status() == qflow.State.COMPLETED for j in jobs])

            await wait_until(all_completed, what="every job to complete")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    assert runs.beside_suspect == set(), f"ran beside the recovered job: {runs.beside_suspect}"
    assert runs.at("start", "s") > max(runs.at("end", "a0"), runs.at("end", "a1"))
    assert min(runs.at("start", "b0"), runs.at("start", "b1")) > runs.at("end", "s")
    info = await qs.get_job(suspect.id)
    assert info.stalls == 1


async def test_a_recovered_job_waiting_to_run_alone_is_released_at_a_stop(
    app: qflow.App, caplog: pytest.LogCaptureFixture
) -> None:
    """At a graceful stop, a suspect still waiting for the jobs in flight goes back to waiting at once."""
    q = app.queue("suspect_stop")
    release_a = asyncio.Event()
    ran: list[str] = []

    @q.processor(concurrency=4)
    async def work(job: qflow.Job[str]) -> None:
        ran.append(job.payload)
        if job.payload == "a":
            await release_a.wait()

    suspect = await q.add("work", "s")
    await dead_claim(q, suspect)
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    try:
        with caplog.at_level(logging.INFO, logger="qflow"):
            await asyncio.wait_for(worker.ready.wait(), 5)
            a = await q.add("work", "a")
            await wait_until(lambda: ran == ["a"], what="a to run")
            await app.redis().zadd(q.keys.active, {suspect.id: 0})
            await wait_until(lambda: held(caplog), what="the recovered job to be held")
            worker.stop()

            async def suspect_waiting() -> bool:
                return await suspect.status() == qflow.State.WAITING

            # Released while "a" still runs: it does not wait for the drain of the jobs in flight.
            await wait_until(suspect_waiting, what="the recovered job to go back to waiting")
            assert not task.done()
            release_a.set()
            await asyncio.wait_for(task, 15)
    finally:
        release_a.set()
        if not task.done():
            worker.stop(fast=True)
            await asyncio.wait_for(task, 15)
    assert ran == ["a"]
    assert await a.status() == qflow.State.COMPLETED
    info = await q.get_job(suspect.id)
    assert (info.state, info.attempts_spent, info.stalls) == (qflow.State.WAITING, 0, 1)
    assert (await q.stats())["released"] == 1
