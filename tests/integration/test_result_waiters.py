"""Result waiters leave nothing behind that outlives its use (issue 12 item 8).

A finishing script pushes to a job's notify list when someone waits; the waiter's blocking BLMOVE rotates the
list and does not consume it. What an earlier life of an id left there (the id reused after retention trimmed
the job, or the job put back by ``retry_failed``) once ended every blocking wait at once, and ``result()``
spun through thousands of script calls. These tests count the server's commands on a server of their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import qflow
from qflow._broker import scripts
from qflow._settings import RetentionSettings
from qflow.testing import FAST, drain, local_server

WAIT = 0.5  # seconds a result() waits for a job nobody runs


@pytest.fixture(scope="module")
def own_url() -> Iterator[str]:
    """A server no other test talks to, so its command counters are this test's alone."""
    with local_server() as url:
        yield url


@pytest.fixture
async def app(own_url: str, prefix: str) -> AsyncIterator[qflow.App]:
    """An App on the module's own server; completed jobs are trimmed at once (completed_count 0)."""
    a = qflow.App(
        own_url,
        prefix=prefix,
        worker=FAST,
        retention=RetentionSettings(completed_count=0, completed_age=7 * 24 * 3600.0),
    )
    yield a
    await a.close()


@pytest.fixture
def work(app: qflow.App) -> qflow.Queue:
    """A queue whose ``ok`` jobs complete and whose ``boom`` jobs fail, one attempt each."""
    q = app.queue("work")

    @q.processor
    async def ok(job: qflow.Job[int]) -> int:
        return job.payload

    @q.processor(attempts=1)
    async def boom(job: qflow.Job[int]) -> None:
        raise ValueError(job.payload)

    return q


async def calls(app: qflow.App) -> dict[str, int]:
    """Calls so far of the commands a result wait sends (INFO commandstats)."""
    stats = await app.redis().info("commandstats")
    return {cmd: int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in ("evalsha", "blmove")}


async def calls_of_a_result_wait(app: qflow.App, job: qflow.Job[object]) -> dict[str, int]:
    """The commands one ``job.result(timeout=WAIT)`` sends while nobody runs the job (it times out)."""
    before = await calls(app)
    with pytest.raises(qflow.ResultTimeout):
        await job.result(timeout=WAIT)
    after = await calls(app)
    return {cmd: after[cmd] - before[cmd] for cmd in after}


async def test_a_result_wait_on_an_id_reused_after_trimming_blocks_instead_of_spinning(
    work: qflow.Queue,
) -> None:
    """An id whose awaited first life completed and was trimmed, added again: a result wait on it sends a
    handful of commands, not thousands."""
    first = await work.add("ok", 1, job_id="reused")
    await scripts.watch(work.app.redis(), work.keys, first.id)  # someone awaits the first life
    await drain(work.app, [work])
    assert await first.status() is None  # trimmed at once
    again = await work.add("ok", 2, job_id="reused")
    sent = await calls_of_a_result_wait(work.app, again)
    assert sent["evalsha"] <= 4, sent
    assert sent["blmove"] <= 4, sent


async def test_a_result_wait_on_a_job_put_back_by_retry_failed_blocks_instead_of_spinning(
    work: qflow.Queue,
) -> None:
    """A job whose awaited first run failed, requeued by retry_failed: a result wait on it sends a handful of
    commands, not thousands."""
    job = await work.add("boom", 1)
    await scripts.watch(work.app.redis(), work.keys, job.id)
    await drain(work.app, [work])
    with pytest.raises(qflow.JobFailed):
        await job.result(timeout=5)
    assert await work.retry_failed([job.id]) == qflow.RetryReport(requeued=1)
    sent = await calls_of_a_result_wait(work.app, job)
    assert sent["evalsha"] <= 4, sent
    assert sent["blmove"] <= 4, sent


async def test_a_notify_list_lives_a_minute_at_most_and_holds_one_element(work: qflow.Queue) -> None:
    """With retention of a week, the notify list of an awaited job that completed expires within 60 s and
    holds one element, however often the id was awaited and finished before."""
    client = work.app.redis()
    notify = work.keys.notify("n")
    await client.rpush(notify, *["completed"] * 5)  # left by earlier lives
    job = await work.add("ok", 1, job_id="n")
    await scripts.watch(client, work.keys, job.id)
    await client.rpush(notify, "completed")  # a push that raced the watch, from an earlier life
    await drain(work.app, [work])
    assert await client.lrange(notify, 0, -1) == [b"completed"]
    assert 0 < await client.pttl(notify) <= scripts.NOTIFY_TTL_MAX_MS


async def test_a_waiter_entry_goes_when_its_job_fails_by_recovery_or_is_retried(work: qflow.Queue) -> None:
    """A waiter's entry on a job failed as stalled is removed by the recovery, and retry_failed removes the
    entry of a failed job (a finished life leaves no waiter behind)."""
    client = work.app.redis()
    k = work.keys
    job = await work.add("ok", 1)
    await scripts.watch(client, k, job.id)
    [held] = (await scripts.claim(client, k, count=1, lease_ms=60_000)).jobs
    await client.zadd(k.active, {held.id: 1}, xx=True)  # its lease long expired
    done = await scripts.recover(
        client, k, checker="t", lock_ms=1, max_stalls=0, stalled_error=b"x", keep_count=10, keep_age_ms=-1
    )
    assert done is not None
    assert done.failed == 1
    assert await client.hexists(k.waiters, job.id) == 0
    await client.hset(k.waiters, job.id, 1)  # a waiter that registered on the failed job
    assert await work.retry_failed([job.id]) == qflow.RetryReport(requeued=1)
    assert await client.hexists(k.waiters, job.id) == 0
