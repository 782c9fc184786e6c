"""Claim-ahead against a real server: short jobs are claimed ahead, unstarted ones go back on stop."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest
import redis

import qflow
from qflow.testing import FAST, drain

from .test_worker_behaviour import wait_until


async def test_claimed_ahead_job_is_released_at_once_on_stop_without_an_attempt(app: qflow.App) -> None:
    """c=1: while one job runs, one more is claimed ahead; a stop hands it back before the drain ends."""
    q = app.queue("ahead")
    gate = asyncio.Event()
    blocked = asyncio.Event()
    done: list[str] = []

    @q.processor(concurrency=1)
    async def work(job: qflow.Job[str]) -> None:
        if job.payload == "block":
            blocked.set()
            await gate.wait()
        done.append(job.payload)

    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 5)
    await q.add_bulk([qflow.JobSpec("work", f"warm{i}") for i in range(5)])
    await wait_until(lambda: len(done) == 5)  # quick handlers: the worker now claims ahead
    jobs = await q.add_bulk([qflow.JobSpec("work", p) for p in ("block", "next", "later1", "later2")])
    block, nxt = jobs[0], jobs[1]
    await asyncio.wait_for(blocked.wait(), 5)

    async def two_held() -> bool:
        return await app.redis().zcard(q.keys.active) == 2

    await wait_until(two_held)
    assert await nxt.status() == qflow.State.ACTIVE
    assert "next" not in done

    worker.stop()

    async def released() -> bool:
        return await nxt.status() == qflow.State.WAITING

    await wait_until(released, timeout=2)  # while the running job still drains (drain timeout 5 s)
    assert await block.status() == qflow.State.ACTIVE
    assert not task.done()
    assert await app.redis().hget(q.keys.attempts, nxt.id) is None
    gate.set()
    await asyncio.wait_for(task, 10)
    assert await block.status() == qflow.State.COMPLETED
    assert "next" not in done
    assert [await j.status() for j in jobs[1:]] == [qflow.State.WAITING] * 3
    assert await app.redis().zcard(q.keys.active) == 0
    assert (await q.stats())["released"] == 1


async def test_max_jobs_claims_no_more_than_it_will_run(app: qflow.App) -> None:
    """With claim-ahead on, ``max_jobs=5`` handles exactly 5 and never claims (then releases) a sixth."""
    q = app.queue("budget")

    @q.processor(concurrency=2)
    async def quick(job: qflow.Job[int]) -> int:
        return job.payload

    await q.add_bulk([qflow.JobSpec("quick", i) for i in range(20)])
    worker = qflow.Worker(app, settings=FAST, max_jobs=5)
    await asyncio.wait_for(worker.run(), 10)
    assert worker.jobs_handled == 5
    counts = await q.counts()
    assert counts["completed"] == 5
    assert counts["waiting"] == 15
    assert counts["active"] == 0
    assert (await q.stats()).get("released", 0) == 0


async def test_job_waiting_in_line_whose_lease_is_lost_is_not_run(
    app: qflow.App, caplog: pytest.LogCaptureFixture
) -> None:
    """A job claimed ahead whose lease is taken over while it waits for a lane is skipped, never run here."""
    q = app.queue("lost_in_line")
    gate = asyncio.Event()
    blocked = asyncio.Event()
    done: list[str] = []

    @q.processor(concurrency=1)
    async def work(job: qflow.Job[str]) -> None:
        if job.payload == "block":
            blocked.set()
            await gate.wait()
        done.append(job.payload)

    caplog.set_level(logging.WARNING, logger="qflow._worker")
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), 5)
    await q.add_bulk([qflow.JobSpec("work", f"warm{i}") for i in range(5)])
    await wait_until(lambda: len(done) == 5)
    _, nxt = await q.add_bulk([qflow.JobSpec("work", p) for p in ("block", "next")])
    await asyncio.wait_for(blocked.wait(), 5)

    async def claimed() -> bool:
        return await nxt.status() == qflow.State.ACTIVE

    await wait_until(claimed)
    # Another delivery takes the job over (as a recovery and a new claim would): its token changes.
    await app.redis().hset(q.keys.tokens, nxt.id, "taken-over")
    await wait_until(
        lambda: any("lost" in r.getMessage() and nxt.id in r.getMessage() for r in caplog.records)
    )
    gate.set()
    await wait_until(lambda: worker.jobs_handled == 6 and worker.in_flight == 0)
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert "next" not in done
    assert await nxt.status() == qflow.State.ACTIVE  # still the other delivery's
    assert (await q.stats()).get("released", 0) == 0


@pytest.mark.parametrize("behind", [False, True], ids=["wait_then_claim", "claim_behind_wait"])
async def test_stop_ends_an_idle_workers_blocking_wait_at_once(
    redis_url: str, prefix: str, behind: bool
) -> None:
    """An idle worker blocked on the server (with or without a claim queued behind) stops without waiting."""
    app = qflow.App(redis_url, prefix=prefix, socket_timeout=60.0)
    q = app.queue("idle_stop")

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        pass

    settings = msgspec.structs.replace(FAST, block_timeout=30.0, claim_behind_wait=behind)
    worker = qflow.Worker(app, settings=settings)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 5)

        async def blocked() -> bool:
            clients = await app.redis().client_list()
            return any(c.get("cmd") == "bzpopmin" and "b" in c.get("flags", "") for c in clients)

        await wait_until(blocked)
        worker.stop()
        await asyncio.wait_for(task, 5)  # 30 s if the wait were left to time out
    finally:
        await app.close()


@pytest.mark.parametrize("behind", [False, True], ids=["wait_then_claim", "claim_behind_wait"])
async def test_stops_racing_adds_leave_no_job_active_and_lose_none(app: qflow.App, behind: bool) -> None:
    """Stop an idle worker as jobs arrive, again and again: each job is then waiting or done, never stuck."""
    q = app.queue("stop_race")
    runs: dict[int, int] = {}

    @q.processor(concurrency=4)
    async def work(job: qflow.Job[int]) -> None:
        runs[job.payload] = runs.get(job.payload, 0) + 1

    settings = msgspec.structs.replace(FAST, claim_behind_wait=behind)
    for round_ in range(15):
        worker = qflow.Worker(app, settings=settings)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 5)
        await asyncio.sleep(0.01 * (round_ % 4))  # let the fetcher park on some rounds
        adds = asyncio.gather(*(q.add("work", round_ * 10 + i) for i in range(4)))
        worker.stop()
        await adds
        await asyncio.wait_for(task, 10)
        assert await app.redis().zcard(q.keys.active) == 0
    await drain(app)
    assert len(runs) == 60
    assert set(runs.values()) == {1}
    assert (await q.counts())["completed"] == 60


async def test_without_client_commands_an_idle_worker_waits_then_claims(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Under an ACL that forbids CLIENT, pickup falls back to wait-then-claim; jobs run, stop is prompt."""
    user = f"{prefix}-user"
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", user, "on", "nopass", "~*", "&*", "+@all", "-client")
    parts = urlsplit(redis_url)
    url = urlunsplit(parts._replace(netloc=f"{user}:x@{parts.hostname}:{parts.port}"))
    app = qflow.App(url, prefix=prefix, worker=FAST)
    try:
        q = app.queue("acl")
        ran = asyncio.Event()

        @q.processor
        async def work(job: qflow.Job[int]) -> None:
            ran.set()

        caplog.set_level(logging.INFO, logger="qflow._worker")
        worker = qflow.Worker(app, settings=msgspec.structs.replace(FAST, claim_behind_wait=True))
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 5)
        await wait_until(lambda: any("CLIENT ID refused" in r.getMessage() for r in caplog.records))
        job = await q.add("work", 1)
        await asyncio.wait_for(ran.wait(), 5)
        worker.stop()
        await asyncio.wait_for(task, 5)
        assert await job.status() == qflow.State.COMPLETED
    finally:
        await app.close()
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
