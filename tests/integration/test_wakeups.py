"""The wake-ups idle fetchers block on (issue 14; issue 19 item 2): the queue's ``marker`` sorted set and the
``timer`` that names the one idle fetcher timing its wait to the earliest delayed job.

Script by script: every push to ``wait`` leaves the wake-up ``now``; a delayed job due before every other
leaves ``due`` and ends the holder's role; the claim gives the role to one idle fetcher and hands it on when
that fetcher fills up or stops; keys of the wrong type are refused with nothing written. Then with workers:
one add wakes one of eight idle workers (not all), and a job put back by recovery or an operator runs at once,
not at some fetcher's block_timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

import qflow
from qflow._broker import scripts
from qflow._broker.keys import QueueKeys
from qflow.testing import FAST, drain, local_server

LONG_MS = 60_000
HOLD_MS = 2_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client with raw replies, as qflow's own."""
    c = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    yield c
    await c.aclose()


@pytest.fixture
def k(prefix: str) -> QueueKeys:
    return QueueKeys(prefix, "wake")


async def marker(client: aioredis.Redis, k: QueueKeys) -> dict[str, float]:
    return {m.decode(): s for m, s in await client.zrange(k.marker, 0, -1, withscores=True)}


async def add(client: aioredis.Redis, k: QueueKeys, *ids: str, delay_ms: int = 0) -> None:
    jobs = [scripts.NewJob(i, f"env-{i}".encode(), delay_ms=delay_ms) for i in ids]
    assert await scripts.add(client, k, jobs) == [True] * len(ids)


async def claim(
    client: aioredis.Redis, k: QueueKeys, count: int, fetcher: str = "", spare: int = 1
) -> scripts.ClaimReply:
    return await scripts.claim(
        client, k, count=count, lease_ms=LONG_MS, fetcher=fetcher, spare=spare, hold_ms=HOLD_MS
    )


async def due_at(client: aioredis.Redis, k: QueueKeys, job_id: str) -> float:
    score = await client.zscore(k.delayed, job_id)
    assert score is not None
    return float(score)


# -- the scripts --------------------------------------------------------------------------------------------


async def test_every_push_to_wait_leaves_the_wake_up_now(client: aioredis.Redis, k: QueueKeys) -> None:
    """add, a retry now, release, recover, an operator's retry and a claim that leaves jobs waiting: each one
    leaves ``now`` for an idle fetcher (taken away before each step, as a fetcher's BZPOPMIN would)."""
    taken = 0

    async def take() -> None:
        nonlocal taken
        assert await marker(client, k) == {"now": 0.0}, f"no wake-up after step {taken}"
        await client.zpopmin(k.marker)
        taken += 1

    await add(client, k, "a", "b", "c", "d")
    await take()
    held = {j.id: j.token for j in (await claim(client, k, 2)).jobs}  # two left waiting
    await take()
    assert await scripts.retry(client, k, "a", held[b"a"], delay_ms=0, error=b"e") is True
    await take()
    assert await scripts.release(client, k, [("b", held[b"b"])]) == [True]
    await take()
    held = {j.id: j.token for j in (await claim(client, k, 10)).jobs}
    assert await marker(client, k) == {}, "nothing waits: no wake-up"
    await client.zadd(k.active, dict.fromkeys(held, 1), xx=True)  # every lease long expired
    recovered = await scripts.recover(
        client, k, checker="t", lock_ms=1, max_stalls=5, stalled_error=b"s", keep_count=10, keep_age_ms=-1
    )
    assert recovered is not None
    assert recovered.requeued == 4
    await take()
    for job in (await claim(client, k, 10)).jobs:
        await scripts.fail(
            client, k, job.id, job.token, b"x", spent=True, keep_count=10, keep_age_ms=-1, notify_ttl_ms=1000
        )
    await scripts.retry_failed(client, k, ["a"])
    await take()


async def test_a_delayed_job_due_first_wakes_a_fetcher_and_ends_the_holders_role(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """A job delayed before every other: ``due`` at its time and the timer deleted; a later one: nothing."""
    await add(client, k, "late", delay_ms=20_000)  # the first delayed job is the earliest
    assert await marker(client, k) == {"due": await due_at(client, k, "late")}
    await client.zpopmin(k.marker)
    await client.set(k.timer, "holder-a")
    await add(client, k, "later", delay_ms=30_000)
    assert await marker(client, k) == {}
    assert await client.get(k.timer) == b"holder-a"
    await add(client, k, "soon", delay_ms=10_000)
    assert await marker(client, k) == {"due": await due_at(client, k, "soon")}
    assert await client.get(k.timer) is None
    # A retry with a backoff due first does the same.
    await client.set(k.timer, "holder-b")
    await add(client, k, "j")
    [job] = (await claim(client, k, 1)).jobs
    assert await scripts.retry(client, k, "j", job.token, delay_ms=1_000, error=b"e") is True
    assert await marker(client, k) == {"now": 0.0, "due": await due_at(client, k, "j")}
    assert await client.get(k.timer) is None


async def test_one_idle_fetcher_holds_the_timer_and_is_told_the_due_time(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """The first idle claimer takes the timer (for its wait plus one more) and gets the due time; the next
    gets -1; the holder keeps it; a claim without a fetcher id gets the due time as it is."""
    await add(client, k, "d", delay_ms=5_000)
    first = await claim(client, k, 1, fetcher="A")
    assert 4_000 < first.next_due_ms <= 5_000
    assert await client.get(k.timer) == b"A"
    assert 0 < await client.pttl(k.timer) <= 2 * HOLD_MS
    assert (await claim(client, k, 1, fetcher="B")).next_due_ms == -1
    assert (await claim(client, k, 1, fetcher="A")).next_due_ms > 0
    assert (await claim(client, k, 1)).next_due_ms > 0
    assert await client.get(k.timer) == b"A"


async def test_a_holder_that_fills_its_slots_or_stops_hands_the_timer_on(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """A holder whose claim fills its slots, or that claims nothing on its way out, leaves ``due`` for another
    idle fetcher and the timer free; so does a claim that finds nobody holding it while it cannot."""
    await add(client, k, "d", delay_ms=5_000)
    await client.delete(k.marker)
    assert (await claim(client, k, 1, fetcher="A")).next_due_ms > 0
    await add(client, k, "now")
    await client.delete(k.marker)
    busy = await claim(client, k, 1, fetcher="A", spare=0)  # took its one job: no slot left
    assert [j.id for j in busy.jobs] == [b"now"]
    assert busy.next_due_ms == -1
    assert await marker(client, k) == {"due": await due_at(client, k, "d")}
    assert await client.get(k.timer) is None
    await client.delete(k.marker)
    assert (await claim(client, k, 1, fetcher="B")).next_due_ms > 0  # the next idle claimer holds it
    assert (await claim(client, k, 0, fetcher="B", spare=0)).next_due_ms == -1  # a stopping holder
    assert await marker(client, k) == {"due": await due_at(client, k, "d")}
    assert await client.get(k.timer) is None


async def snapshot(client: aioredis.Redis, k: QueueKeys) -> dict[str, Any]:
    """Every fixed key of the queue, serialized (DUMP): equal snapshots mean nothing was written."""
    return {name: await client.dump(name) for name in k.all_fixed() if name != k.checker}


async def refused(
    client: aioredis.Redis, k: QueueKeys, call: Callable[[], Awaitable[object]], key: str
) -> None:
    before = await snapshot(client, k)
    with pytest.raises(qflow.CorruptQueue) as caught:
        await call()
    assert await snapshot(client, k) == before
    assert isinstance(caught.value.__cause__, ResponseError)
    assert str(caught.value.__cause__).startswith("QFLOW_CORRUPT ")
    assert key in str(caught.value)


async def test_a_marker_or_timer_of_the_wrong_type_is_refused_with_nothing_written(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """Each script that writes a wake-up refuses a ``marker`` that is not a sorted set, and the claim a
    ``timer`` that is not a string, naming the key, before any write."""
    await add(client, k, "a", "b", "c")
    held = {j.id.decode(): j.token for j in (await claim(client, k, 2)).jobs}
    await client.delete(k.marker)
    await client.set(k.marker, "garbage")
    await refused(client, k, lambda: add(client, k, "x"), k.marker)
    await refused(client, k, lambda: add(client, k, "y", delay_ms=1_000), k.marker)
    await refused(client, k, lambda: claim(client, k, 1), k.marker)
    await refused(
        client, k, lambda: scripts.retry(client, k, "a", held["a"], delay_ms=0, error=b"e"), k.marker
    )
    await refused(client, k, lambda: scripts.release(client, k, [("b", held["b"])]), k.marker)
    await client.zadd(k.active, {"a": 1, "b": 1}, xx=True)
    await refused(
        client,
        k,
        lambda: scripts.recover(
            client, k, checker="t", lock_ms=1, max_stalls=5, stalled_error=b"s", keep_count=10, keep_age_ms=-1
        ),
        k.marker,
    )
    await client.delete(k.marker, k.checker)
    await client.hset(k.timer, "x", "1")
    await refused(client, k, lambda: claim(client, k, 1, fetcher="A"), k.timer)


# -- with workers -------------------------------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[str]:
    """A valkey-server for this test alone: its commandstats count only the test's commands."""
    with local_server() as url:
        yield url


async def test_one_add_wakes_one_of_eight_idle_workers(own_server: str) -> None:
    """Eight idle workers (default settings), ten adds one at a time: each add costs about one wake-up and one
    claim, where BLMOVE on ``wait`` woke all eight (90 BLMOVEs for 10 adds, issue 19)."""
    app = qflow.App(own_server, prefix="herd")
    q = app.queue("herd")
    ran = asyncio.Event()

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        ran.set()

    workers = [qflow.Worker(app) for _ in range(8)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for w in workers:
            await asyncio.wait_for(w.ready.wait(), 10)
        await asyncio.sleep(0.3)
        client = app.redis()
        before = await client.info("commandstats")
        started = time.monotonic()
        for i in range(10):
            ran.clear()
            await q.add("work", i)
            await asyncio.wait_for(ran.wait(), 5)
        await asyncio.sleep(0.1)  # the acks
        after = await client.info("commandstats")
        elapsed = time.monotonic() - started
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        await app.close()

    def calls(cmd: str) -> int:
        return int(after.get(f"cmdstat_{cmd}", {}).get("calls", 0)) - int(
            before.get(f"cmdstat_{cmd}", {}).get("calls", 0)
        )

    assert elapsed < 2.0, "a block_timeout went by: some add woke nobody"
    # Per add: the woken fetcher's wait ends (1) and it parks again (1); a claim; an ack (adds: 10 more).
    assert calls("bzpopmin") <= 25, calls("bzpopmin")
    assert calls("evalsha") <= 10 + 25, calls("evalsha")
    assert calls("blmove") == 0


async def test_a_job_put_back_by_recovery_wakes_an_idle_worker_at_once(redis_url: str, prefix: str) -> None:
    """An idle worker whose block_timeout is 30 s runs a job recovered from a dead worker's expired lease, and
    one an operator retried, within a second (on the old wait they were pushed without waking anyone waiting
    on the marker)."""
    settings = msgspec.structs.replace(FAST, block_timeout=30.0)
    app = qflow.App(redis_url, prefix=prefix, worker=settings, socket_timeout=60.0)
    q = app.queue("back")
    ran: list[int] = []
    event = asyncio.Event()

    @q.processor(attempts=1)
    async def work(job: qflow.Job[int]) -> None:
        ran.append(job.payload)
        event.set()
        if len(ran) == 1:
            raise ValueError("the first run fails for good")

    client = app.redis()
    failing = await q.add("work", 2)
    await drain(app, [q])
    assert await failing.status() == qflow.State.FAILED
    await q.add("work", 1)
    await scripts.claim(client, q.keys, count=1, lease_ms=1)  # a worker that died with it
    await client.delete(q.keys.marker)  # and took the wake-up with it
    event.clear()
    worker = qflow.Worker(app)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 5)
        # Its own stalled-job check (every 0.25 s) puts the job back while its fetcher is parked for 30 s.
        await asyncio.wait_for(event.wait(), 1.5)
        event.clear()
        await asyncio.sleep(0.2)  # parked again
        assert await q.retry_failed([failing.id]) == qflow.RetryReport(requeued=1)
        await asyncio.wait_for(event.wait(), 1.0)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await app.close()
    assert ran == [2, 1, 2]


async def test_a_holder_that_gets_busy_hands_the_timer_to_the_idle_worker(
    redis_url: str, prefix: str
) -> None:
    """Two workers of one job each (default settings), jobs of 0.4 s due every 0.2 s: whichever worker runs a
    job hands the timer to the other, which starts the next one on time (a busy holder kept it before, and the
    next job waited for the idle worker's block_timeout)."""
    apps = [qflow.App(redis_url, prefix=prefix) for _ in range(2)]
    started: dict[int, float] = {}
    for app in apps:

        @app.queue("relay").processor(concurrency=1)
        async def slow(job: qflow.Job[int], app: qflow.App = app) -> None:
            secs, micros = await app.redis().execute_command("TIME")  # type: ignore[no-untyped-call]
            started[job.payload] = int(secs) * 1000 + int(micros) / 1000
            await asyncio.sleep(0.4)

    workers = [qflow.Worker(app) for app in apps]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for w in workers:
            await asyncio.wait_for(w.ready.wait(), 10)
        await asyncio.sleep(0.2)
        q = apps[0].queue("relay")
        jobs = [await q.add("slow", i, delay=0.5 + 0.2 * i) for i in range(6)]
        due = [await apps[0].redis().zscore(q.keys.delayed, j.id) for j in jobs]
        for j in jobs:
            await j.result(timeout=5)
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        for app in apps:
            await app.close()
    late = [started[i] - float(d or 0) for i, d in enumerate(due)]
    assert min(late) >= 0
    assert max(late) <= 50, late  # a few ms each here; one block_timeout (2 s) without the hand-off
