"""Retention by count holds under load (issue 12 item 7).

A finishing script trims at least as many jobs as it just finished: with ack batches larger than the old
fixed trim of 100 per call, the completed set grew past ``completed_count`` without bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

import qflow
from qflow._broker import scripts
from qflow._broker.keys import QueueKeys
from qflow._settings import RetentionSettings
from qflow.testing import drain

LONG_MS = 60_000
KEEP = 50


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client with raw replies, as qflow's own."""
    c = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    yield c
    await c.aclose()


async def add_many(client: aioredis.Redis, k: QueueKeys, n: int) -> None:
    for start in range(0, n, 500):
        jobs = [scripts.NewJob(f"j{i}", b"env") for i in range(start, min(start + 500, n))]
        await scripts.add(client, k, jobs)


async def per_job_fields(client: aioredis.Redis, k: QueueKeys) -> tuple[int, ...]:
    """How many jobs each per-job hash still holds: jobs, state, results."""
    return (await client.hlen(k.jobs), await client.hlen(k.state), await client.hlen(k.results))


async def test_complete_batches_of_200_keep_the_completed_set_at_its_count(
    client: aioredis.Redis, prefix: str
) -> None:
    """Batches of 200 completions with completed_count 50: after every batch at most 50 completed jobs remain,
    and the per-job fields of the trimmed ones are gone."""
    k = QueueKeys(prefix, "keep")
    await add_many(client, k, 1000)
    sizes = []
    while True:
        held = (await scripts.claim(client, k, count=200, lease_ms=LONG_MS)).jobs
        if not held:
            break
        flags = await scripts.complete(
            client,
            k,
            [(j.id, j.token, b"\xc0") for j in held],
            keep_count=KEEP,
            keep_age_ms=-1,
            notify_ttl_ms=LONG_MS,
        )
        assert all(flags)
        sizes.append(await client.zcard(k.completed))
    assert sizes == [KEEP] * 5
    assert await per_job_fields(client, k) == (KEEP, KEEP, KEEP)


async def test_recovery_that_fails_many_jobs_keeps_the_failed_set_at_its_count(
    client: aioredis.Redis, prefix: str
) -> None:
    """300 expired leases failed as stalled in one recovery, failed_count 50: 50 failed jobs remain."""
    k = QueueKeys(prefix, "stalled")
    await add_many(client, k, 300)
    held = (await scripts.claim(client, k, count=300, lease_ms=LONG_MS)).jobs
    await client.zadd(k.active, {j.id: 1 for j in held}, xx=True)  # every lease long expired
    done = await scripts.recover(
        client,
        k,
        checker="t",
        lock_ms=LONG_MS,
        max_stalls=0,
        stalled_error=b"stalled",
        keep_count=KEEP,
        keep_age_ms=-1,
    )
    assert done is not None
    assert done.failed == 300
    assert await client.zcard(k.failed) == KEEP
    assert await client.hlen(k.errors) == KEEP
    assert await client.hlen(k.jobs) == KEEP


async def test_a_worker_at_high_concurrency_keeps_completed_within_retention(
    redis_url: str, prefix: str
) -> None:
    """3,000 no-op jobs run at concurrency 400 with completed_count 50: the completed set ends at most 50."""
    app = qflow.App(redis_url, prefix=prefix, retention=RetentionSettings(completed_count=KEEP))
    try:
        q = app.queue("busy")

        @q.processor
        async def noop(job: qflow.Job[int]) -> int:
            return job.payload

        for start in range(0, 3000, 500):
            await q.add_bulk([qflow.JobSpec("noop", i) for i in range(start, start + 500)])
        await drain(app, [q], concurrency=400, timeout=60)
        counts = await q.counts()
        assert (counts["waiting"], counts["active"]) == (0, 0)
        assert counts["completed"] <= KEEP
        assert (await q.stats())["completed"] == 3000
    finally:
        await app.close()
