"""The public admin operations against a real server: ``Queue.get_job``, ``retry_failed`` and ``purge``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

import qflow
from qflow.testing import FAST, drain


@pytest.fixture
def work(app: qflow.App) -> qflow.Queue:
    """A queue with one processor that fails (``boom``) and one that completes (``ok``), one attempt each."""
    q = app.queue("work")

    @q.processor
    async def boom(job: qflow.Job[str]) -> None:
        raise ValueError(job.payload)

    @q.processor
    async def ok(job: qflow.Job[int | None]) -> int | None:
        return job.payload

    return q


async def failed_ids(q: qflow.Queue, n: int, tag: str) -> list[str]:
    """Add ``n`` failing jobs and run them; their failures are recorded in the order they were added."""
    ids = []
    for i in range(n):
        job = await q.add("boom", f"{tag}{i}", job_id=f"{tag}{i}")
        await drain(q.app, [q])  # one at a time: each fails at a later server time than the one before
        ids.append(job.id)
    return ids


async def server_now(app: qflow.App) -> float:
    """Seconds on the test server's clock."""
    seconds, micros = await app.redis().time()
    return seconds + micros / 1e6


# -- retry_failed ---------------------------------------------------------------------------------------


async def test_retry_failed_by_ids_requeues_the_failed_and_reports_the_others(work: qflow.Queue) -> None:
    """Failed ids go back to waiting with attempts and error cleared; a completed id and an unknown id are
    reported in ``not_failed`` and ``missing`` and left as they were."""
    first, second = await failed_ids(work, 2, "f")
    done = await work.add("ok", 1)
    await drain(work.app, [work])

    report = await work.retry_failed([first, done.id, "nope"])

    assert report == qflow.RetryReport(requeued=1, not_failed=[done.id], missing=["nope"])
    assert await work.job(first).status() == qflow.State.WAITING
    info = await work.get_job(first)
    assert (info.attempts_spent, info.error, info.since) == (0, None, None)
    assert await work.job(second).status() == qflow.State.FAILED
    assert await work.job(done.id).status() == qflow.State.COMPLETED
    assert (await work.stats())["requeued"] == 1
    assert await work.retry_failed([]) == qflow.RetryReport(requeued=0)


async def test_retry_failed_with_a_limit_takes_the_oldest_failures_first(work: qflow.Queue) -> None:
    """``limit=2`` requeues the two oldest failures; without ids or limit every remaining one goes back."""
    ids = await failed_ids(work, 3, "o")

    assert await work.retry_failed(limit=2) == qflow.RetryReport(requeued=2)
    waiting, failed = qflow.State.WAITING, qflow.State.FAILED
    assert [await work.job(i).status() for i in ids] == [waiting, waiting, failed]
    assert await work.retry_failed() == qflow.RetryReport(requeued=1)
    assert (await work.counts())["failed"] == 0
    assert await work.retry_failed() == qflow.RetryReport(requeued=0)


async def test_retry_failed_spans_several_script_calls(app: qflow.App, work: qflow.Queue) -> None:
    """More jobs than one script call moves (500): a limit of 510, then 20 ids, are all honoured exactly."""
    await work.add_bulk([qflow.JobSpec("boom", str(i), job_id=f"b{i}") for i in range(540)])
    await app.run_worker([work], concurrency=64, burst=True, settings=FAST)
    assert (await work.counts())["failed"] == 540

    assert await work.retry_failed(limit=510) == qflow.RetryReport(requeued=510)
    assert (await work.counts())["failed"] == 30
    still_failed = [f"b{i}" for i in range(540) if await work.job(f"b{i}").status() == qflow.State.FAILED]
    report = await work.retry_failed(still_failed[:20] * 30)  # 600 ids; each repeat finds its job waiting
    assert (report.requeued, len(report.not_failed), report.missing) == (20, 580, [])
    assert (await work.counts()) == {
        "waiting": 530,
        "active": 0,
        "delayed": 0,
        "completed": 0,
        "failed": 10,
        "expired": 0,
    }


@pytest.mark.parametrize(
    ("ids", "limit", "message"),
    [
        (["a"], 1, "not both"),
        (None, 0, "limit must be an int >= 1"),
        (None, True, "limit must be an int >= 1"),
        ("abc", None, "got one string"),
        ([""], None, "non-empty str"),
    ],
)
async def test_retry_failed_refuses_bad_arguments(
    work: qflow.Queue, ids: object, limit: object, message: str
) -> None:
    """Both ids and a limit, a limit below 1, one string for ids or an empty id raise ConfigurationError."""
    with pytest.raises(qflow.ConfigurationError, match=message):
        await work.retry_failed(ids, limit=limit)  # type: ignore[arg-type]


# -- purge ----------------------------------------------------------------------------------------------


@pytest.fixture
async def apps(redis_url: str, prefix: str) -> AsyncIterator[tuple[qflow.App, qflow.App]]:
    """Two apps whose prefixes a careless ``MATCH`` would mix up: ``<p>:x*`` and ``<p>:xyz``."""
    starry = qflow.App(redis_url, prefix=f"{prefix}:x*", worker=FAST)
    plain = qflow.App(redis_url, prefix=f"{prefix}:xyz", worker=FAST)
    yield starry, plain
    await starry.close()
    await plain.close()


async def fill(q: qflow.Queue) -> list[str]:
    """Give ``q`` a completed, a failed, a waiting and a delayed job and a result waiter's notify list;
    return every key it now has."""

    @q.processor
    async def run(job: qflow.Job[str]) -> str:
        if job.payload == "fail":
            raise RuntimeError("no")
        return job.payload

    await q.add("run", "done")
    await q.add("run", "fail")
    await drain(q.app, [q])
    await q.add("run", "later")
    await q.add("run", "much later", delay=3600)
    client = q.app.redis()
    await client.rpush(q.keys.notify("someone-waits"), 1)
    keys = [k for k in (*q.keys.all_fixed(), q.keys.notify("someone-waits")) if await client.exists(k)]
    assert len(keys) > 10
    return keys


async def test_purge_deletes_every_key_of_its_queue_and_nothing_else(
    apps: tuple[qflow.App, qflow.App],
) -> None:
    """Purge deletes the queue's keys, notify lists included, and leaves alone another queue of the same app
    and the same queue name under a prefix its own prefix's ``*`` would match as a pattern."""
    starry, plain = apps
    target, sibling, lookalike = starry.queue("a"), starry.queue("b"), plain.queue("a")
    mine = await fill(target)
    others = [*await fill(sibling), *await fill(lookalike)]
    client = starry.redis()

    assert await target.purge() == len(mine)

    assert await client.exists(*mine) == 0
    assert await client.exists(*others) == len(others)
    assert await target.counts() == {
        "waiting": 0,
        "active": 0,
        "delayed": 0,
        "completed": 0,
        "failed": 0,
        "expired": 0,
    }
    assert await target.stats() == {}
    assert await sibling.counts() == {
        "waiting": 1,
        "active": 0,
        "delayed": 1,
        "completed": 1,
        "failed": 1,
        "expired": 0,
    }
    assert await target.purge() == 0
    job = await target.add("run", "again")
    assert await job.status() == qflow.State.WAITING


async def test_testing_purge_is_queue_purge(app: qflow.App) -> None:
    """``qflow.testing.purge``, kept for test suites, deletes the same keys as ``Queue.purge``."""
    from qflow.testing import purge

    q = app.queue("t")
    await q.add("x", 1)
    stored = await app.redis().exists(*q.keys.all_fixed())
    assert stored > 0
    assert await purge(q) == stored
    assert await q.counts() == {
        "waiting": 0,
        "active": 0,
        "delayed": 0,
        "completed": 0,
        "failed": 0,
        "expired": 0,
    }


# -- get_job --------------------------------------------------------------------------------------------


async def test_get_job_of_a_waiting_and_a_delayed_job(work: qflow.Queue) -> None:
    """A waiting job has no time; a delayed one carries when it is due, by the server's clock."""
    waiting = await work.add("ok", 5)
    delayed = await work.add("ok", 6, delay=60)

    info = await work.get_job(waiting.id)
    assert info == qflow.JobInfo(
        queue="work",
        id=waiting.id,
        state=qflow.State.WAITING,
        name="ok",
        payload=5,
        attempts_spent=0,
        stalls=0,
        options=info.options,
    )
    later = await work.get_job(delayed.id)
    assert (later.state, later.payload, later.has_result) == (qflow.State.DELAYED, 6, False)
    assert later.since == pytest.approx(await server_now(work.app) + 60, abs=2)


async def test_get_job_of_an_active_then_completed_job(app: qflow.App) -> None:
    """While it runs a job is active until its lease deadline; once done it has its result and finish time."""
    q = app.queue("slow")
    release = asyncio.Event()

    @q.processor
    async def hold(job: qflow.Job[None]) -> None:
        await release.wait()

    job = await q.add("hold")
    worker = asyncio.create_task(app.run_worker([q], burst=True, settings=FAST))
    deadline = time.monotonic() + 5
    while await job.status() != qflow.State.ACTIVE:
        assert time.monotonic() < deadline, "the job never became active"
        await asyncio.sleep(0.01)

    active = await q.get_job(job.id)
    now = await server_now(app)
    assert active.state == qflow.State.ACTIVE
    assert active.since is not None
    assert now < active.since <= now + FAST.lease_ttl + 0.5
    assert (active.has_result, active.error) == (False, None)

    release.set()
    await asyncio.wait_for(worker, 10)
    done = await q.get_job(job.id)
    assert (done.state, done.result, done.has_result) == (qflow.State.COMPLETED, None, True)
    assert done.since == pytest.approx(await server_now(app), abs=2)


async def test_get_job_of_a_failed_job_and_of_an_unknown_id(work: qflow.Queue) -> None:
    """A failed job carries its last error and spent attempt; an unknown id raises JobNotFound."""
    (failed,) = await failed_ids(work, 1, "x")

    info = await work.get_job(failed)
    assert (info.state, info.name, info.payload, info.attempts_spent) == (qflow.State.FAILED, "boom", "x0", 1)
    assert info.error is not None
    assert (info.error["type"], info.error["message"], info.error["kind"]) == ("ValueError", "x0", "error")
    assert "raise ValueError" in info.error["traceback"]
    assert (info.has_result, info.result) == (False, None)
    assert info.since == pytest.approx(await server_now(work.app), abs=5)

    with pytest.raises(qflow.JobNotFound, match="no job 'nope' in queue 'work'"):
        await work.get_job("nope")
