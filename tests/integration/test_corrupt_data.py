"""Corrupt data in Redis fails only what it belongs to (issue 12 item 1; DESIGN.md, data-model rules).

Redis keeps the writes a script made before an error. So every script validates and reads first and writes
last: a key of the wrong type or a corrupt ``seq`` makes the call answer a ``QFLOW_CORRUPT`` error (raised as
``qflow.CorruptQueue``) naming the key before anything is written (no job leaves ``wait``, none is half
moved), and a job whose own stored data is corrupt (a counter that is not a number) fails alone, with kind
"corrupt", while its batch goes on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

import qflow
from qflow import _codec
from qflow._broker import scripts
from qflow._broker.keys import QueueKeys
from qflow.testing import drain

LONG_MS = 60_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client with raw replies, as qflow's own."""
    c = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    yield c
    await c.aclose()


@pytest.fixture
def k(prefix: str) -> QueueKeys:
    """The keys of this test's queue."""
    return QueueKeys(prefix, "corrupt")


async def snapshot(client: aioredis.Redis, k: QueueKeys) -> dict[str, Any]:
    """Every fixed key of the queue, serialized (DUMP): equal snapshots mean nothing was written."""
    return {name: await client.dump(name) for name in k.all_fixed() if name != k.checker}


async def wrong_type(client: aioredis.Redis, key: str) -> None:
    """Replace ``key`` with a value of a type no script expects there (a string, or a hash for ``seq``)."""
    await client.delete(key)
    if key.endswith(":seq"):
        await client.hset(key, "x", "1")
    else:
        await client.set(key, "garbage")


async def add(client: aioredis.Redis, k: QueueKeys, *ids: str) -> None:
    assert await scripts.add(client, k, [scripts.NewJob(i, f"env-{i}".encode()) for i in ids]) == [
        True
    ] * len(ids)


async def claim(client: aioredis.Redis, k: QueueKeys, count: int) -> dict[str, bytes]:
    """Claim up to ``count`` jobs; their tokens by id."""
    reply = await scripts.claim(client, k, count=count, lease_ms=LONG_MS)
    return {j.id.decode(): j.token for j in reply.jobs}


async def complete(
    client: aioredis.Redis, k: QueueKeys, held: dict[str, bytes], keep: int = 100
) -> list[bool]:
    jobs = [(i, t, b"\xc0") for i, t in held.items()]
    return await scripts.complete(client, k, jobs, keep_count=keep, keep_age_ms=-1, notify_ttl_ms=LONG_MS)


def error_of(raw: bytes | None) -> _codec.ErrorInfo:
    assert raw is not None
    return msgspec.msgpack.decode(raw, type=_codec.ErrorInfo)


async def assert_unchanged(
    client: aioredis.Redis, k: QueueKeys, call: Callable[[], Awaitable[object]], key: str
) -> None:
    """``call`` fails with nothing written (no key of the queue changed), on a QFLOW_CORRUPT error that names
    ``key``."""
    before = await snapshot(client, k)
    with pytest.raises(qflow.CorruptQueue) as caught:
        await call()
    assert await snapshot(client, k) == before
    cause = caught.value.__cause__
    assert isinstance(cause, ResponseError)
    assert str(cause).startswith("QFLOW_CORRUPT ")
    assert key in str(caught.value)


# -- claim -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [b"abc", b"1.5", b"1e5", b"9" * 20, b"1" + b"0" * 17])
async def test_claim_refuses_a_corrupt_seq_before_taking_any_job(
    client: aioredis.Redis, k: QueueKeys, seq: bytes
) -> None:
    """A seq that is not a token counter (not a number, or too large to print exactly): nothing moves."""
    await add(client, k, "a", "b", "c")
    await scripts.add(client, k, [scripts.NewJob("d", b"env-d", delay_ms=LONG_MS)])
    await client.zadd(k.delayed, {"d": 1})  # due: the claim would promote it
    await client.set(k.seq, seq)
    await assert_unchanged(client, k, lambda: claim(client, k, 10), k.seq)
    assert await client.lrange(k.wait, 0, -1) == [b"c", b"b", b"a"]


@pytest.mark.parametrize(
    "name", ["wait", "active", "delayed", "jobs", "state", "tokens", "attempts", "stalls", "seq"]
)
async def test_claim_refuses_a_key_of_the_wrong_type_before_taking_any_job(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """Any key a claim reads or writes holding the wrong type: an error naming it, and nothing written."""
    await add(client, k, "a", "b", "c")
    await scripts.add(client, k, [scripts.NewJob("d", b"env-d", delay_ms=LONG_MS)])
    await client.zadd(k.delayed, {"d": 1})
    key = getattr(k, name)
    await wrong_type(client, key)
    await assert_unchanged(client, k, lambda: claim(client, k, 10), key)


async def test_a_job_with_a_corrupt_counter_fails_alone_and_its_batch_is_claimed(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """Jobs whose attempts or stalls field is not a count fail with kind "corrupt" naming the field and value;
    the other jobs of the batch are leased as usual."""
    await add(client, k, "a", "b", "c", "d", "e", "f")
    await client.hset(k.attempts, "b", "abc")
    await client.hset(k.stalls, "d", "-1")
    await client.hset(k.attempts, "e", "99999999999")  # more than the claim reply's 32 bits
    await client.hset(k.waiters, "b", "1")
    held = await claim(client, k, 10)
    assert sorted(held) == ["a", "c", "f"]
    assert await client.lrange(k.wait, 0, -1) == []
    assert sorted(await client.zrange(k.failed, 0, -1)) == [b"b", b"d", b"e"]
    for job_id, field, value in (
        ("b", "attempts", "'abc'"),
        ("d", "stalls", "'-1'"),
        ("e", "attempts", "'999"),
    ):
        assert await client.hget(k.state, job_id) == b"failed"
        info = error_of(await client.hget(k.errors, job_id))
        assert (info.type, info.kind) == ("CorruptJob", "corrupt")
        assert f"{field} of the job is {value}" in info.message
    assert await client.hget(k.stats, "failed") == b"3"
    assert await client.hexists(k.waiters, "b") == 0  # nobody waits on a finished job
    assert await complete(client, k, held) == [True, True, True]


async def test_a_worker_runs_the_healthy_jobs_beside_corrupt_ones(app: qflow.App) -> None:
    """A worker claiming a batch with corrupt counters runs every healthy job; the corrupt ones fail alone."""
    q = app.queue("mixed")

    @q.processor(concurrency=10)
    async def echo(job: qflow.Job[int]) -> int:
        return job.payload

    jobs = [await q.add("echo", i) for i in range(8)]
    client = app.redis()
    await client.hset(q.keys.attempts, jobs[2].id, "two")
    await client.hset(q.keys.stalls, jobs[5].id, "1.5")
    await drain(app, [q])
    for i, job in enumerate(jobs):
        if i in (2, 5):
            with pytest.raises(qflow.JobFailed) as failed:
                await job.result(timeout=5)
            assert failed.value.kind == "corrupt"
            assert ("'two'" if i == 2 else "'1.5'") in str(failed.value)
        else:
            assert await job.result(timeout=5) == i
    counts = await q.counts()
    assert (counts["waiting"], counts["active"], counts["completed"], counts["failed"]) == (0, 0, 6, 2)


# -- the other scripts -----------------------------------------------------------------------------------

COMPLETE_WRITES = [
    "active",
    "tokens",
    "state",
    "results",
    "completed",
    "jobs",
    "attempts",
    "stalls",
    "errors",
]


@pytest.mark.parametrize("name", [*COMPLETE_WRITES, "waiters", "stats"])
async def test_complete_refuses_a_key_of_the_wrong_type_before_recording_any_result(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """A complete (with trimming) on a queue where a key it writes holds the wrong type: nothing recorded."""
    await add(client, k, "a", "b")
    held = await claim(client, k, 2)
    key = getattr(k, name)
    await wrong_type(client, key)
    await assert_unchanged(client, k, lambda: complete(client, k, held, keep=0), key)


async def test_a_stats_counter_that_is_not_a_number_starts_again(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """A counter of the stats hash written by hand does not stop completions: it counts again from them."""
    await add(client, k, "a", "b")
    held = await claim(client, k, 2)
    await client.hset(k.stats, mapping={"completed": "lots", "stale_acks": "9" * 30})
    assert await complete(client, k, {**held, "ghost": b"1"}) == [True, True, False]
    assert await client.hmget(k.stats, ["completed", "stale_acks"]) == [b"2", b"1"]
    assert sorted(await client.zrange(k.completed, 0, -1)) == [b"a", b"b"]


async def test_retry_with_a_corrupt_attempts_counter_requeues_and_the_claim_fails_it(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """A retry leaves a corrupt attempts field as it is and requeues the job; the next claim fails it."""
    await add(client, k, "a")
    held = await claim(client, k, 1)
    await client.hset(k.attempts, "a", "many")
    assert await scripts.retry(client, k, "a", held["a"], delay_ms=0, error=b"e") is True
    assert await client.lrange(k.wait, 0, -1) == [b"a"]
    assert await claim(client, k, 1) == {}
    assert "attempts of the job is 'many'" in error_of(await client.hget(k.errors, "a")).message


async def test_fail_with_a_corrupt_attempts_counter_still_fails_the_job(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """A fail records the job as failed with its own error, whatever its attempts field holds."""
    await add(client, k, "a")
    held = await claim(client, k, 1)
    await client.hset(k.attempts, "a", "many")
    ok = await scripts.fail(
        client, k, "a", held["a"], b"boom", spent=True, keep_count=10, keep_age_ms=-1, notify_ttl_ms=LONG_MS
    )
    assert ok is True
    assert (await client.hget(k.state, "a"), await client.hget(k.errors, "a")) == (b"failed", b"boom")
    assert await client.zrange(k.failed, 0, -1) == [b"a"]
    assert await client.zcard(k.active) == 0


@pytest.mark.parametrize("name", ["state", "errors", "failed", "results", "jobs", "waiters", "stats"])
async def test_fail_refuses_a_key_of_the_wrong_type_before_writing(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """A fail (with trimming) on a queue where a key it writes holds the wrong type: nothing written."""
    await add(client, k, "a")
    held = await claim(client, k, 1)
    key = getattr(k, name)
    await wrong_type(client, key)
    await assert_unchanged(
        client,
        k,
        lambda: scripts.fail(
            client,
            k,
            "a",
            held["a"],
            b"boom",
            spent=True,
            keep_count=0,
            keep_age_ms=-1,
            notify_ttl_ms=LONG_MS,
        ),
        key,
    )


async def test_recover_fails_a_job_with_a_corrupt_stall_counter_alone(
    client: aioredis.Redis, k: QueueKeys
) -> None:
    """Expired leases are recovered; the one whose stalls field is not a count fails as corrupt, alone."""
    await add(client, k, "a", "b", "c")
    await claim(client, k, 3)
    await client.zadd(k.active, {"a": 1, "b": 1, "c": 1}, xx=True)  # every lease long expired
    await client.hset(k.stalls, "b", "x")
    done = await scripts.recover(
        client,
        k,
        checker="t",
        lock_ms=LONG_MS,
        max_stalls=5,
        stalled_error=b"stalled",
        keep_count=10,
        keep_age_ms=-1,
    )
    assert done is not None
    assert (done.requeued, done.failed) == (2, 1)
    assert sorted(await client.lrange(k.wait, 0, -1)) == [b"a", b"c"]
    assert await client.zrange(k.failed, 0, -1) == [b"b"]
    assert "stalls of the job is 'x'" in error_of(await client.hget(k.errors, "b")).message
    assert await client.zcard(k.active) == 0


@pytest.mark.parametrize("name", ["wait", "state", "failed", "errors", "stalls", "jobs", "stats"])
async def test_recover_refuses_a_key_of_the_wrong_type_before_moving_any_job(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """Recovery (failing some jobs as stalled, and trimming) with a key it writes of the wrong type: nothing
    moves."""
    await add(client, k, "a", "b")
    await claim(client, k, 2)
    await client.zadd(k.active, {"a": 1, "b": 1}, xx=True)
    await client.hset(k.stalls, "b", "3")  # b fails as stalled, a goes back to wait
    key = getattr(k, name)
    await wrong_type(client, key)
    await assert_unchanged(
        client,
        k,
        lambda: scripts.recover(
            client,
            k,
            checker="t",
            lock_ms=LONG_MS,
            max_stalls=2,
            stalled_error=b"stalled",
            keep_count=0,
            keep_age_ms=-1,
        ),
        key,
    )


@pytest.mark.parametrize("name", ["wait", "state", "stats"])
async def test_release_refuses_a_key_of_the_wrong_type_before_moving_any_job(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """A release with a key it writes of the wrong type: an error naming it; the jobs stay leased."""
    await add(client, k, "a", "b")
    held = await claim(client, k, 2)
    key = getattr(k, name)
    await wrong_type(client, key)
    await assert_unchanged(client, k, lambda: scripts.release(client, k, list(held.items())), key)


@pytest.mark.parametrize("name", ["wait", "delayed", "state", "attempts", "errors", "stats"])
async def test_retry_refuses_a_key_of_the_wrong_type_before_moving_the_job(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """A retry (now or later) with a key it writes of the wrong type: an error naming it; the job stays."""
    await add(client, k, "a")
    held = await claim(client, k, 1)
    key = getattr(k, name)
    await wrong_type(client, key)
    delay = LONG_MS if name == "delayed" else 0
    await assert_unchanged(
        client, k, lambda: scripts.retry(client, k, "a", held["a"], delay_ms=delay, error=b"e"), key
    )


@pytest.mark.parametrize("name", ["wait", "delayed", "state", "jobs"])
async def test_add_refuses_a_key_of_the_wrong_type_before_writing(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """An add with a key it writes of the wrong type: an error naming it, and no envelope stored (a retried
    add with the same job_id would otherwise find the job "existing" and it would never run)."""
    await add(client, k, "old")
    key = getattr(k, name)
    await wrong_type(client, key)
    jobs = [scripts.NewJob("a", b"env-a"), scripts.NewJob("b", b"env-b", delay_ms=LONG_MS)]
    await assert_unchanged(client, k, lambda: scripts.add(client, k, jobs), key)


@pytest.mark.parametrize("name", ["wait", "state", "attempts", "stats", "failed"])
async def test_retry_failed_refuses_a_key_of_the_wrong_type_before_moving_any_job(
    client: aioredis.Redis, k: QueueKeys, name: str
) -> None:
    """An operator's retry with a key it writes of the wrong type: an error naming it; jobs stay failed."""
    await add(client, k, "a", "b")
    held = await claim(client, k, 2)
    for job_id, token in held.items():
        await scripts.fail(
            client,
            k,
            job_id,
            token,
            b"boom",
            spent=True,
            keep_count=10,
            keep_age_ms=-1,
            notify_ttl_ms=LONG_MS,
        )
    key = getattr(k, name)
    await wrong_type(client, key)
    await assert_unchanged(client, k, lambda: scripts.retry_failed(client, k, ["a", "b"]), key)
    await assert_unchanged(client, k, lambda: scripts.retry_oldest_failed(client, k, 10), key)
