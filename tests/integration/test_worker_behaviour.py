"""Worker behaviour against a real server: retries, delays, timeouts, leases, recovery, drain, retention."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

import qflow
from qflow._broker import scripts
from qflow.testing import FAST, drain
from tests.support import running, wait_until


async def claim_as_dead_worker(q: qflow.Queue, lease_ms: int) -> list[bytes]:
    """Claim jobs like a worker that then dies: the ids sit in ``active`` under a lease nobody renews."""
    res = await scripts.claim(q.app.redis(), q.keys, count=10, lease_ms=lease_ms, promote_limit=100)
    return [job.id for job in res.jobs]


async def test_failed_attempts_are_retried_until_success(app: qflow.App) -> None:
    """A handler that raises twice with attempts=3 runs three times and completes; two retries are counted."""
    q = app.queue("retry")
    attempts: list[int] = []

    @q.processor(attempts=3, backoff=qflow.Backoff(kind="fixed", delay=0.0))
    async def flaky(job: qflow.Job[None]) -> str:
        attempts.append(job.attempt)
        if job.attempt < 3:
            raise RuntimeError(f"boom {job.attempt}")
        return "ok"

    job = await q.add("flaky")
    await drain(app)
    assert await job.result(timeout=1) == "ok"
    assert attempts == [1, 2, 3]
    assert (await q.stats())["retried"] == 2


async def test_exhausted_attempts_fail_with_type_message_traceback(app: qflow.App) -> None:
    """After its last attempt the job is failed, with the error's type, message and traceback stored."""
    q = app.queue("fail")

    @q.processor(attempts=2)
    async def broken(job: qflow.Job[int]) -> None:
        raise ValueError(f"bad value {job.payload}")

    job = await q.add("broken", 7)
    await drain(app)
    with pytest.raises(qflow.JobFailed) as info:
        await job.result(timeout=1)
    assert info.value.error_type == "ValueError"
    assert info.value.message == "bad value 7"
    assert "in broken" in info.value.traceback
    assert await job.status() == qflow.State.FAILED
    assert int(await app.redis().hget(q.keys.attempts, job.id)) == 2
    assert (await q.counts())["failed"] == 1


async def test_retry_exception_delays_next_attempt(app: qflow.App) -> None:
    """``raise qflow.Retry(delay=0.4)`` parks the job in ``delayed`` and runs it again no sooner than that."""
    q = app.queue("retry-delay")
    started: list[float] = []

    @q.processor(attempts=2)
    async def later(job: qflow.Job[None]) -> int:
        started.append(time.monotonic())
        if job.attempt == 1:
            raise qflow.Retry(delay=0.4)
        return job.attempt

    job = await q.add("later")
    async with running(qflow.Worker(app, settings=FAST)):
        await wait_until(lambda: started, timeout=5)
        await wait_until(
            lambda: _is(job, qflow.State.DELAYED, qflow.State.ACTIVE, qflow.State.COMPLETED), timeout=5
        )
        assert await job.result(timeout=5) == 2
    assert started[1] - started[0] >= 0.35


async def _is(job: qflow.Job[object], *states: qflow.State) -> bool:
    return await job.status() in states


async def test_delayed_job_waits_for_its_time(app: qflow.App) -> None:
    """``add(delay=0.5)`` keeps the job delayed until the server clock passes its time, then it runs."""
    q = app.queue("delayed")
    ran_at: list[float] = []

    @q.processor
    async def tick(job: qflow.Job[None]) -> None:
        ran_at.append(time.monotonic())

    added = time.monotonic()
    job = await q.add("tick", delay=0.5)
    assert await job.status() == qflow.State.DELAYED
    assert (await q.counts())["delayed"] == 1
    await drain(app)
    assert await job.status() == qflow.State.COMPLETED
    assert ran_at[0] - added >= 0.45


async def test_run_at_in_the_past_is_waiting_at_once(app: qflow.App) -> None:
    """``run_at`` in the past makes the job waiting immediately; a naive datetime is refused."""
    q = app.queue("run-at")
    job = await q.add("x", run_at=datetime.now(UTC) - timedelta(minutes=5))
    assert await job.status() == qflow.State.WAITING
    future = await q.add("x", run_at=datetime.now(UTC) + timedelta(minutes=5))
    assert await future.status() == qflow.State.DELAYED
    with pytest.raises(qflow.ConfigurationError, match="timezone-aware"):
        await q.add("x", run_at=datetime.now())


async def test_timeout_cancels_the_handler_and_fails_the_job(app: qflow.App) -> None:
    """A handler running past ``timeout`` is cancelled and the job fails with a TimeoutError."""
    q = app.queue("timeout")
    cancelled = asyncio.Event()

    @q.processor(timeout=0.2)
    async def slow(job: qflow.Job[None]) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job = await q.add("slow")
    await drain(app)
    assert cancelled.is_set()
    with pytest.raises(qflow.JobFailed) as info:
        await job.result(timeout=1)
    assert info.value.error_type == "TimeoutError"
    assert "timeout of 0.2s" in info.value.message


async def test_concurrency_bounds_jobs_in_flight_per_processor(app: qflow.App) -> None:
    """With concurrency=3 no more than 3 jobs of that processor run at once in one worker."""
    q = app.queue("bounded")
    running_now = 0
    peak = 0

    @q.processor(concurrency=3)
    async def step(job: qflow.Job[int]) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.02)
        running_now -= 1

    await q.add_bulk([qflow.JobSpec("step", i) for i in range(20)])
    await drain(app)
    assert peak == 3
    assert (await q.counts())["completed"] == 20


async def test_idle_worker_is_woken_by_a_push_not_by_polling(app: qflow.App) -> None:
    """An idle worker blocking for 5 s per call still starts a new job long before its block timeout."""
    q = app.queue("idle")
    started = asyncio.Event()

    @q.processor
    async def ping(job: qflow.Job[None]) -> None:
        started.set()

    settings = qflow.WorkerSettings(lease_ttl=5, check_interval=5, block_timeout=5)
    redis = app.redis()
    blocked_before = (await redis.info("clients"))["blocked_clients"]
    async with running(qflow.Worker(app, settings=settings)):

        async def fetcher_blocked() -> bool:
            return bool((await redis.info("clients"))["blocked_clients"] > blocked_before)

        await wait_until(fetcher_blocked, timeout=5)
        t0 = time.monotonic()
        await q.add("ping")
        await asyncio.wait_for(started.wait(), 2.0)
        assert time.monotonic() - t0 < 2.0


async def test_same_job_id_added_twice_makes_one_job(app: qflow.App) -> None:
    """``job_id=`` is idempotent, also for concurrent adds from two connection pools."""
    q = app.queue("idem")
    other = qflow.App(app.url, prefix=app.prefix)
    q2 = other.queue("idem")
    try:
        handles = await asyncio.gather(
            *(q.add("x", i, job_id="order-1") for i in range(10)),
            *(q2.add("x", i, job_id="order-1") for i in range(10)),
        )
    finally:
        await other.close()
    assert {h.id for h in handles} == {"order-1"}
    assert await app.redis().llen(q.keys.wait) == 1
    assert await app.redis().hlen(q.keys.jobs) == 1


async def test_dead_workers_jobs_are_recovered_and_counted_as_stalls(app: qflow.App) -> None:
    """Jobs claimed by a worker that died run again after lease expiry; the recovery counts as a stall."""
    q = app.queue("stalled")
    seen: list[tuple[int, int]] = []

    @q.processor
    async def work(job: qflow.Job[None]) -> None:
        seen.append((job.attempt, job.stalls))

    job = await q.add("work")
    assert len(await claim_as_dead_worker(q, lease_ms=300)) == 1
    t0 = time.monotonic()
    await drain(app)
    recovered_after = time.monotonic() - t0
    assert await job.status() == qflow.State.COMPLETED
    assert seen == [(1, 1)]  # attempt 1 again: a crash does not spend an attempt
    assert (await q.stats())["stalled"] == 1
    assert recovered_after < 0.3 + FAST.check_interval + 2.0


async def test_job_failing_more_than_max_stalls_fails_as_stalled(app: qflow.App) -> None:
    """A job whose worker dies more than ``max_stalls`` times fails with reason 'stalled'."""
    q = app.queue("poison")

    @q.processor
    async def never(job: qflow.Job[None]) -> None:
        raise AssertionError("a job over its stall limit must not run")

    job = await q.add("never")
    worker = qflow.Worker(app, settings=qflow.WorkerSettings(lease_ttl=1, check_interval=0.05, max_stalls=1))
    for _ in range(2):
        assert len(await claim_as_dead_worker(q, lease_ms=0)) == 1
        await app.redis().delete(q.keys.checker)
        assert await worker.check_stalled(q) == [job.id]
    with pytest.raises(qflow.JobFailed) as info:
        await job.result(timeout=1)
    assert info.value.error_type == "Stalled"
    assert "max_stalls=1" in info.value.message


async def test_one_stalled_checker_acts_per_interval(app: qflow.App) -> None:
    """Two checkers in the same interval: the first recovers the job, the second is locked out."""
    q = app.queue("checker")

    @q.processor
    async def work(job: qflow.Job[None]) -> None:
        return None

    await q.add("work")
    await claim_as_dead_worker(q, lease_ms=0)
    a = qflow.Worker(app, settings=qflow.WorkerSettings(check_interval=5))
    b = qflow.Worker(app, settings=qflow.WorkerSettings(check_interval=5))
    first, second = await a.check_stalled(q), await b.check_stalled(q)
    assert len(first) == 1
    assert second == []


async def test_lease_renewal_keeps_a_long_job_owned(app: qflow.App) -> None:
    """A job running 2.5x its lease TTL keeps its lease by renewal: one run, no stall, no stale ack."""
    q = app.queue("long")
    runs = 0

    @q.processor
    async def long(job: qflow.Job[None]) -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(2.5 * FAST.lease_ttl)

    job = await q.add("long")
    await drain(app)
    assert await job.status() == qflow.State.COMPLETED
    assert runs == 1
    stats = await q.stats()
    assert "stalled" not in stats
    assert "stale_acks" not in stats


async def test_ack_from_an_expired_lease_is_rejected_and_counted(app: qflow.App) -> None:
    """A completion carrying an expired lease's token changes nothing and is counted as a stale ack."""
    q = app.queue("stale")
    job = await q.add("x", 1)
    claim = await scripts.claim(app.redis(), q.keys, count=1, lease_ms=0, promote_limit=100)
    [claimed] = claim.jobs
    flags = await scripts.complete(
        app.redis(),
        q.keys,
        [(job.id, claimed.token, b"\xc0")],
        keep_count=100,
        keep_age_ms=-1,
        notify_ttl_ms=60000,
    )
    assert flags == [False]
    assert await job.status() == qflow.State.ACTIVE
    assert (await q.stats())["stale_acks"] == 1


async def test_lost_lease_cancels_the_running_handler(app: qflow.App) -> None:
    """When renewal finds the lease taken over, the local handler is cancelled and its ack never applied."""
    q = app.queue("lost")
    started, cancelled = asyncio.Event(), asyncio.Event()

    @q.processor
    async def victim(job: qflow.Job[None]) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    job = await q.add("victim")
    async with running(qflow.Worker(app, settings=FAST)) as run:
        await asyncio.wait_for(started.wait(), 5)
        await app.redis().hset(q.keys.tokens, job.id, b"someone-else")
        await run.worker.renew_leases()
        await asyncio.wait_for(cancelled.wait(), 5)
    assert await job.status() == qflow.State.ACTIVE  # still owned by "someone else": nothing applied


async def test_graceful_stop_lets_in_flight_jobs_finish(app: qflow.App) -> None:
    """``stop()`` stops fetching and waits for in-flight jobs, which complete."""
    q = app.queue("drain")
    started = asyncio.Event()

    @q.processor(concurrency=4)
    async def work(job: qflow.Job[int]) -> int:
        started.set()
        await asyncio.sleep(0.5)
        return job.payload

    jobs = await q.add_bulk([qflow.JobSpec("work", i) for i in range(4)])
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert [await j.status() for j in jobs] == [qflow.State.COMPLETED] * 4


async def test_drain_timeout_releases_jobs_without_spending_an_attempt(app: qflow.App) -> None:
    """Jobs still running at the drain timeout are cancelled and put back to waiting at once, attempt kept."""
    q = app.queue("release")
    started = 0

    @q.processor(concurrency=3, attempts=1)
    async def slow(job: qflow.Job[int]) -> None:
        nonlocal started
        started += 1
        await asyncio.sleep(30)

    jobs = await q.add_bulk([qflow.JobSpec("slow", i) for i in range(3)])
    settings = qflow.WorkerSettings(lease_ttl=30, check_interval=5, drain_timeout=0.2)
    worker = qflow.Worker(app, settings=settings)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: started == 3, timeout=5)
    worker.stop()
    await asyncio.wait_for(task, 5)
    assert [await j.status() for j in jobs] == [qflow.State.WAITING] * 3
    assert await app.redis().hlen(q.keys.attempts) == 0
    assert await app.redis().zcard(q.keys.active) == 0
    assert (await q.stats())["released"] == 3


async def test_completed_jobs_are_trimmed_by_count(app: qflow.App) -> None:
    """With ``completed_count=5``, only the 5 newest completed jobs (and their data) are kept."""
    q = app.queue("trim", retention=qflow.RetentionSettings(completed_count=5))

    @q.processor(concurrency=1)
    async def noop(job: qflow.Job[int]) -> int:
        return job.payload

    jobs = await q.add_bulk([qflow.JobSpec("noop", i) for i in range(20)])
    await drain(app)
    redis = app.redis()
    assert await redis.zcard(q.keys.completed) == 5
    assert await redis.hlen(q.keys.jobs) == 5
    assert await redis.hlen(q.keys.results) == 5
    assert await redis.hlen(q.keys.state) == 5
    assert await jobs[-1].result(timeout=1) == 19
    assert await jobs[0].status() is None


async def test_completed_jobs_are_trimmed_by_age(app: qflow.App) -> None:
    """With ``completed_age=0`` a completed job's data is dropped as soon as it completes."""
    q = app.queue("trim-age", retention=qflow.RetentionSettings(completed_age=0))

    @q.processor
    async def noop(job: qflow.Job[None]) -> None:
        return None

    await q.add_bulk([qflow.JobSpec("noop") for _ in range(3)])
    await drain(app)
    assert await app.redis().zcard(q.keys.completed) == 0
    assert await app.redis().hlen(q.keys.jobs) == 0
    assert (await q.stats())["completed"] == 3


async def test_worker_warns_when_the_server_breaks_the_durability_promise(
    app: qflow.App, caplog: pytest.LogCaptureFixture
) -> None:
    """At start a worker warns about AOF off or an evicting maxmemory-policy, naming the setting to change."""
    q = app.queue("warn")

    @q.processor
    async def noop(job: qflow.Job[None]) -> None:
        return None

    info = await app.redis().info()
    worker = qflow.Worker(app, burst=True, settings=FAST)
    with caplog.at_level("WARNING", logger="qflow"):
        await worker.run()
    expected_aof = str(info.get("aof_enabled")) != "1"
    expected_policy = info.get("maxmemory_policy") != "noeviction"
    assert any("appendonly yes" in w for w in worker.server_warnings) == expected_aof
    assert any("noeviction" in w for w in worker.server_warnings) == expected_policy
    assert len(worker.server_warnings) == expected_aof + expected_policy
    for text in worker.server_warnings:
        assert text in caplog.text


async def test_every_kind_of_failure_is_logged_once_as_a_warning_in_one_form(
    redis_url: str, app: qflow.App, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler error, an unknown job name, a bad payload and an unencodable result each log one WARNING
    'job Q:ID failed after N attempt(s): Type: message'; the stop line counts them as failed."""
    q = app.queue("logged")

    @q.processor
    async def broken(job: qflow.Job[None]) -> None:
        raise ValueError("handler says no")

    @q.processor
    async def typed(job: qflow.Job[int]) -> int:
        return job.payload

    @q.processor
    async def unencodable(job: qflow.Job[None]) -> object:
        return object()

    # A producer that did not import the processors may add any name and any payload.
    async with qflow.App(redis_url, prefix=app.prefix) as producer:
        pq = producer.queue("logged")
        jobs = {
            "ValueError": await pq.add("broken"),
            "UnknownJobName": await pq.add("send_ghost", {"to": "nobody"}),
            "PayloadError": await pq.add("typed", "not an int"),
        }
    result_job = await unencodable.add(None)

    worker = qflow.Worker(app, burst=True, settings=FAST)
    with caplog.at_level("INFO", logger="qflow"):
        await worker.run()

    failures = [r for r in caplog.records if "failed after" in r.getMessage()]
    by_id = {r.getMessage().split(" ")[1]: r for r in failures}
    assert len(failures) == 4
    for error_type, job in jobs.items():
        record = by_id[f"logged:{job.id}"]
        assert record.levelname == "WARNING"
        prefix = f"job logged:{job.id} failed after 1 attempt(s): {error_type}: "
        assert record.getMessage().startswith(prefix)
    result_line = by_id[f"logged:{result_job.id}"].getMessage()
    assert result_line.startswith(
        f"job logged:{result_job.id} failed after 1 attempt(s): PayloadError: result of"
    )
    assert worker.jobs_failed == 4
    assert "stopped: 4 jobs handled (0 completed, 4 failed, 0 retried)" in caplog.text
