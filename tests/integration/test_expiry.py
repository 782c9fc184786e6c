"""Job expiry (issue 14): ``add(expires=)`` is a deadline for a job's start; a job no worker claimed by then
is recorded ``expired`` by the claim, counted, and never run."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

import qflow
from qflow._broker import commands
from qflow._inspect import list_jobs, queue_info
from qflow._settings import RetentionSettings
from qflow.testing import FAST, drain


async def _server_passes(app: qflow.App, at_ms: int, timeout: float = 5.0) -> None:
    """Poll the server clock (deadline ``timeout``) until it reaches ``at_ms``."""
    deadline = time.monotonic() + timeout
    while await commands.server_ms(app.redis()) < at_ms:
        assert time.monotonic() < deadline, "server clock did not reach the deadline"
        await asyncio.sleep(0.01)


async def test_an_expired_job_never_runs_and_is_counted(app: qflow.App) -> None:
    """Jobs past their deadline are recorded expired, never run; stats, counts, info and result() say so."""
    q = app.queue("exp")
    ran: list[str] = []

    @q.processor
    async def work(job: qflow.Job[str]) -> None:
        ran.append(job.payload)

    start = await commands.server_ms(app.redis())
    late = [await work.add(f"late{i}", expires=0.05) for i in range(3)]
    past = await q.add("work", "past", expires=datetime(2000, 1, 1, tzinfo=UTC))
    keep = await work.add("keep", expires=timedelta(minutes=5))
    await _server_passes(app, start + 100)
    await drain(app, [q])
    assert ran == ["keep"]
    for job in (*late, past):
        assert await job.status() == qflow.State.EXPIRED
        with pytest.raises(qflow.JobExpired) as info:
            await job.result(timeout=1)
        assert isinstance(info.value, qflow.JobFailed)
        assert info.value.kind == "expired"
    assert await keep.result(timeout=1) is None
    assert (await q.stats())["expired"] == 4
    assert (await q.counts())["expired"] == 4
    (info_row,) = await queue_info(app, [q])
    assert info_row.expired == 4
    assert info_row.totals["expired"] == 4
    listed = await list_jobs(q, "expired", 10)
    assert sorted(j.id for j in listed.jobs) == sorted(j.id for j in (*late, past))
    # The deadline of a started job is gone with its start; nothing is left behind for the expired ones.
    assert await app.redis().hlen(q.keys.expires) == 0


async def test_a_delayed_job_whose_expiry_passes_before_its_due_time_never_runs(app: qflow.App) -> None:
    """``delay=0.3, expires=0.1``: the job is discarded when it comes due, never run."""
    q = app.queue("exp-delayed")
    ran: list[str] = []

    @q.processor
    async def work(job: qflow.Job[str]) -> None:
        ran.append(job.payload)

    doomed = await work.add("doomed", delay=0.3, expires=0.1)
    fine = await work.add("fine", delay=0.1, expires=30)
    await drain(app, [q])
    assert ran == ["fine"]
    assert await doomed.status() == qflow.State.EXPIRED
    assert await fine.status() == qflow.State.COMPLETED


async def test_a_job_started_before_its_deadline_retries_after_it(app: qflow.App) -> None:
    """The deadline is for the first start: a job that started in time keeps its retries past it."""
    q = app.queue("exp-retry")
    attempts: list[int] = []

    @q.processor(attempts=3, backoff=qflow.Backoff(kind="fixed", delay=0.2))
    async def flaky(job: qflow.Job[None]) -> str:
        attempts.append(job.attempt)
        if job.attempt < 3:
            raise RuntimeError("again")
        return "done"

    job = await flaky.add(None, expires=0.1)
    await drain(app, [q])
    assert attempts == [1, 2, 3]
    assert await job.result(timeout=1) == "done"


async def test_the_claim_trims_expired_and_failed_jobs_to_the_failed_retention(
    redis_url: str, prefix: str
) -> None:
    """A flood of expired and corrupt jobs keeps ``expired`` and ``failed`` within ``failed_count``."""
    app = qflow.App(redis_url, prefix=prefix, worker=FAST, retention=RetentionSettings(failed_count=5))
    try:
        q = app.queue("exp-trim")

        @q.processor
        async def work(job: qflow.Job[int]) -> None: ...

        gone = [await work.add(i, expires=datetime(2000, 1, 1, tzinfo=UTC)) for i in range(30)]
        corrupt = [await work.add(i) for i in range(30)]
        client = app.redis()
        for job in corrupt:
            await client.hset(q.keys.attempts, job.id, "not-a-number")
        await drain(app, [q], settings=FAST)
        assert await client.zcard(q.keys.expired) <= 5
        assert await client.zcard(q.keys.failed) <= 5
        assert (await q.stats())["expired"] == 30
        assert (await q.stats())["failed"] == 30
        # Trimmed jobs leave nothing behind.
        assert await client.hlen(q.keys.jobs) <= 10
        assert await client.hlen(q.keys.expires) <= 5
        assert await client.hlen(q.keys.state) <= 10
        assert len(gone) == 30
    finally:
        await app.close()


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 1e300, True, "5"])
async def test_expires_is_checked_before_anything_is_written(app: qflow.App, bad: object) -> None:
    """A bad ``expires`` raises ``ConfigurationError`` naming it, and nothing is stored."""
    q = app.queue("exp-bad")
    with pytest.raises(qflow.ConfigurationError, match="expires"):
        await q.add("work", 1, expires=bad)  # type: ignore[arg-type]
    with pytest.raises(qflow.ConfigurationError, match="expires"):
        await q.add_bulk([qflow.JobSpec("work", 1), qflow.JobSpec("work", 2, expires=bad)])  # type: ignore[arg-type]
    with pytest.raises(qflow.ConfigurationError, match="expires"):
        await q.add("work", 1, expires=datetime(2030, 1, 1))  # naive
    assert await app.redis().hlen(q.keys.jobs) == 0


async def test_a_corrupt_expiry_deadline_fails_its_job_alone(app: qflow.App) -> None:
    """A stored deadline that is not a number fails that job (kind "corrupt", naming it); the others run."""
    q = app.queue("exp-corrupt")
    ran: list[int] = []

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        ran.append(job.payload)

    bad = await work.add(1, expires=60)
    good = await work.add(2, expires=60)
    await app.redis().hset(q.keys.expires, bad.id, "soon")
    await drain(app, [q])
    assert ran == [2]
    with pytest.raises(qflow.JobFailed) as info:
        await bad.result(timeout=1)
    assert info.value.kind == "corrupt"
    assert "expiry deadline" in info.value.message
    assert await good.result(timeout=1) is None
