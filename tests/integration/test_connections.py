"""Connections against a real server: the worker's own traffic never waits behind user traffic (renewals and
acks on their own pool), blocking result waits never starve commands, and a full client pool says so
(issue 12 item 2)."""

from __future__ import annotations

import asyncio
import collections
import time

import msgspec
import pytest
import redis.asyncio as aioredis

import qflow
from qflow._broker import commands
from qflow.exceptions import ClientPoolExhausted
from qflow.testing import FAST
from tests.support import running, wait_until


async def test_handlers_awaiting_results_past_the_pool_size_do_not_stall_leases(app: qflow.App) -> None:
    """130 handlers each awaiting another job's result: every job runs once and completes, no lease lost."""
    n = 130  # more than redis-py's default pool of 100 connections
    # Leases of 2 s (renewed every 0.67 s) leave a loaded CI box room; the children run through several
    # renewals while 130 results are awaited.
    settings = msgspec.structs.replace(FAST, lease_ttl=2.0)
    hold = 2.5 * settings.lease_ttl
    q = app.queue("fanout")
    runs: collections.Counter[tuple[str, int]] = collections.Counter()
    waiting = 0

    @q.processor(concurrency=n)
    async def child(job: qflow.Job[int]) -> int:
        runs["child", job.payload] += 1
        await asyncio.sleep(hold)
        return job.payload * 2

    @q.processor(concurrency=n)
    async def parent(job: qflow.Job[int]) -> int:
        nonlocal waiting
        runs["parent", job.payload] += 1
        sub = await q.add("child", job.payload)
        waiting += 1
        try:
            return int(await sub.result(timeout=60))
        finally:
            waiting -= 1

    worker = qflow.Worker(app, settings=settings)
    async with running(worker, ready_timeout=10, stop_timeout=30):
        parents = [await q.add("parent", i) for i in range(n)]
        await wait_until(lambda: waiting == n, timeout=30, what=f"{n} parents awaiting their child's result")
        results = await asyncio.gather(*(p.result(timeout=60) for p in parents))
    assert results == [2 * i for i in range(n)]
    assert runs == {**{("parent", i): 1 for i in range(n)}, **{("child", i): 1 for i in range(n)}}
    assert worker.stale_acks == 0
    assert worker.jobs_done == 2 * n
    stats = await q.stats()
    assert (stats.get("retried", 0), stats.get("stalled", 0), stats.get("stale_acks", 0)) == (0, 0, 0)
    assert await q.counts() == {
        "waiting": 0,
        "active": 0,
        "delayed": 0,
        "completed": 2 * n,
        "failed": 0,
        "expired": 0,
    }


async def test_a_thousand_result_waits_neither_raise_nor_starve_add(app: qflow.App, redis_url: str) -> None:
    """1,000 concurrent result() calls on unfinished jobs: add() still answers at once, and every wait ends
    with its job's result once a worker runs them."""
    # Keep every finished job: with the default 1,000 the oldest of these 1,001 is trimmed at once, and its
    # waiter (woken, then reading the state) would rightly get JobNotFound.
    q = app.queue("waits", retention=qflow.RetentionSettings(completed_count=2000))

    @q.processor(concurrency=100)
    async def echo(job: qflow.Job[int]) -> int:
        return job.payload

    jobs = await q.add_bulk([qflow.JobSpec("echo", i) for i in range(1000)])
    waits = [asyncio.create_task(job.result(timeout=60)) for job in jobs]
    observer = aioredis.Redis.from_url(redis_url)
    try:

        async def settled() -> bool:
            """Some waits failed, or dozens block on the server (the rest queue for a connection)."""
            info = await observer.info("clients")
            return any(t.done() for t in waits) or int(info["blocked_clients"]) >= 40

        await wait_until(settled, timeout=30, what="result waits blocking on the server")
        assert not any(t.done() for t in waits), [t.exception() for t in waits if t.done()][:3]
        started = time.monotonic()
        extra = await q.add("echo", -1)
        assert time.monotonic() - started < 1.0
        assert await extra.status() == qflow.State.WAITING
        async with running(qflow.Worker(app, settings=FAST), ready_timeout=10, stop_timeout=30):
            results = await asyncio.wait_for(asyncio.gather(*waits), 60)
            assert await extra.result(timeout=10) == -1
    finally:
        for t in waits:
            t.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await observer.aclose()
    assert results == list(range(1000))


async def test_more_concurrent_commands_than_connections_wait_their_turn(app: qflow.App) -> None:
    """Three times as many concurrent commands as the pool has connections all succeed: a call finding every
    connection busy waits for one to be released instead of failing at once."""
    q = app.queue("burst")

    @q.processor
    async def noop(job: qflow.Job[None]) -> None: ...

    job = await q.add("noop")
    size = app.redis().connection_pool.max_connections
    states = await asyncio.gather(*(job.status() for _ in range(3 * size)))
    assert states == [qflow.State.WAITING] * (3 * size)


async def test_a_full_client_pool_raises_client_pool_exhausted(redis_url: str, prefix: str) -> None:
    """Every connection of the command pool held (here by subscriptions): the next call raises
    ClientPoolExhausted naming the pool's size and the setting to raise, not BrokerUnavailable."""
    app = qflow.App(redis_url, prefix=prefix, socket_timeout=1.0)
    q = app.queue("full")
    held: list[aioredis.client.PubSub] = []
    try:
        client = app.redis()
        for i in range(client.connection_pool.max_connections):
            pubsub = client.pubsub()
            await pubsub.subscribe(f"{prefix}:channel:{i}")
            held.append(pubsub)
        started = time.monotonic()
        with pytest.raises(ClientPoolExhausted) as info:
            await q.counts()
        assert time.monotonic() - started < 5
        text = str(info.value)
        assert f"all {client.connection_pool.max_connections} connections" in text
        assert "max_connections" in text
    finally:
        for pubsub in held:
            await pubsub.aclose()
        await app.close()


async def test_a_blocking_wait_under_a_millisecond_ends_at_once(app: qflow.App) -> None:
    """A wait of 0.4 ms (a result timeout's last sliver) is sent as 1 ms, not as 0.000, which the server
    reads as "block forever" and the socket timeout then reports as a dead server."""
    started = time.monotonic()
    await commands.wait_for_push(app.redis(), f"{app.prefix}:empty", 0.0004)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_connections": 0}, {"max_result_waits": 0}, {"max_connections": 1.5}, {"max_result_waits": True}],
)
def test_pool_sizes_are_checked_where_they_enter(kwargs: dict[str, object]) -> None:
    """A pool size that is not an int from 1 to 10,000 raises ConfigurationError naming it."""
    with pytest.raises(qflow.ConfigurationError, match=next(iter(kwargs))):
        qflow.App("redis://127.0.0.1:1/0", **kwargs)  # type: ignore[arg-type]
