"""add, claim and complete make one Redis call per batch and hash (issue #6); each job keeps its own outcome.

The scripts read and write whole batches with variadic commands (HMGET, ZMSCORE, HSET f v f v, ZADD, LPUSH),
sent in chunks when a batch is long. These tests drive the scripts directly with batches that mix every case
a per-job loop handled one by one, and batches longer than one chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from qflow._broker import scripts
from qflow._broker.keys import QueueKeys

LONG_MS = 60_000
LATER_MS = 600_000
NOTIFY_TTL_MS = 60_000


class Scripts:
    """The three hot scripts on one queue's real key names, through the broker's typed functions."""

    def __init__(self, client: aioredis.Redis, k: QueueKeys) -> None:
        self.client = client
        self.k = k

    async def add(self, *jobs: tuple[str, str, int, int]) -> list[bool]:
        return await scripts.add(self.client, self.k, [scripts.NewJob(*job) for job in jobs])

    async def claim(
        self, count: int, lease_ms: int = LONG_MS, largest: int | None = None
    ) -> tuple[int, int, list[tuple[str, str, str, int, int]]]:
        """(ms until the next due job, jobs left waiting, (id, token, envelope, attempts, stalls) per job)."""
        res = await scripts.claim(
            self.client, self.k, count=count, lease_ms=lease_ms, max_envelope=largest, too_large=b"too-large"
        )
        jobs = [
            (j.id.decode(), j.token.decode(), j.envelope.decode(), j.attempts, j.stalls) for j in res.jobs
        ]
        return res.next_due_ms, res.waiting, jobs

    async def complete(self, pairs: list[tuple[str, str]], keep: int = 100_000) -> str:
        """One character per ack, as complete.lua answers: "1" recorded, "0" stale."""
        flags = await scripts.complete(
            self.client,
            self.k,
            [(job_id, token, f"res-{job_id}-{token}") for job_id, token in pairs],
            keep_count=keep,
            keep_age_ms=-1,
            notify_ttl_ms=NOTIFY_TTL_MS,
        )
        return "".join("1" if ok else "0" for ok in flags)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the test server, with decoded replies."""
    c = aioredis.Redis.from_url(redis_url, socket_timeout=10, decode_responses=True)
    yield c
    await c.aclose()


@pytest.fixture
def k(prefix: str) -> QueueKeys:
    """The keys of this test's queue."""
    return QueueKeys(prefix, "batching")


@pytest.fixture
async def s(redis_url: str, k: QueueKeys) -> AsyncIterator[Scripts]:
    """The scripts on this test's queue (a client with raw replies: claim's reply is packed bytes)."""
    raw = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    yield Scripts(raw, k)
    await raw.aclose()


async def server_ms(client: aioredis.Redis) -> int:
    sec, usec = await client.time()
    return sec * 1000 + usec // 1000


async def test_add_batch_mixes_waiting_delayed_existing_and_repeated_ids(
    s: Scripts, client: aioredis.Redis, k: QueueKeys
) -> None:
    """One add of immediate, delayed, past and future run_at, existing and repeated ids: each as if alone."""
    assert await s.add(("old", "env-old", 0, 0)) == [True]
    now = await server_ms(client)
    reply = await s.add(
        ("a", "env-a", 0, 0),
        ("later", "env-later", LATER_MS, 0),
        ("b", "env-b", 0, now - 5_000),  # run_at in the past: waits at once
        ("at", "env-at", 0, now + LATER_MS),
        ("old", "env-new", 0, 0),  # exists: kept
        ("c", "env-c", 0, 0),
        ("a", "env-a2", LATER_MS, 0),  # repeated in the batch: the first one won
    )
    assert reply == [True, True, True, True, False, True, False]
    # LPUSH order: the first added is the first claimed (wait is consumed from the right).
    assert await client.lrange(k.wait, 0, -1) == ["c", "b", "a", "old"]
    assert await client.zrange(k.delayed, 0, -1) == ["at", "later"]
    assert await client.hgetall(k.state) == {
        "old": "waiting",
        "a": "waiting",
        "later": "delayed",
        "b": "waiting",
        "at": "delayed",
        "c": "waiting",
    }
    assert await client.hmget(k.jobs, ["old", "a"]) == ["env-old", "env-a"]
    due = await client.zscore(k.delayed, "later")
    assert due is not None
    assert now + LATER_MS - 1_000 <= due <= now + LATER_MS + 60_000  # timed by the server clock


async def test_add_longer_than_one_chunk_keeps_arrival_order(
    s: Scripts, client: aioredis.Redis, k: QueueKeys
) -> None:
    """An add of 1,200 jobs (more arguments than one variadic call takes) queues them all, in order."""
    ids = [f"j{n:04d}" for n in range(1200)]
    assert await s.add(*((i, f"env-{i}", 0, 0) for i in ids)) == [True] * 1200
    assert await client.lrange(k.wait, 0, -1) == ids[::-1]
    assert await client.hlen(k.state) == 1200
    assert await client.hget(k.state, ids[-1]) == "waiting"
    _, left, jobs = await s.claim(1200)
    assert [j[0] for j in jobs] == ids
    assert left == 0


async def test_claim_batch_with_missing_oversize_and_repeated_jobs(
    s: Scripts, client: aioredis.Redis, k: QueueKeys
) -> None:
    """A claim batch of good, missing, oversize and repeated ids treats each one as a claim of one would."""
    await s.add(
        ("a", "env-a", 0, 0), ("gone", "env-gone", 0, 0), ("big", "x" * 100, 0, 0), ("b", "env-b", 0, 0)
    )
    await client.hdel(k.jobs, "gone")  # deleted by hand
    await client.lpush(k.wait, "a")  # the same id twice in wait
    await client.hset(k.attempts, "b", 2)
    await client.hset(k.stalls, "b", 1)
    first_token = int(await client.get(k.seq) or 0) + 1
    _, left, jobs = await s.claim(10, largest=50)
    assert left == 0
    # Tokens follow the position in the batch, skipped jobs included; the later lease of "a" is the one held.
    assert jobs == [
        ("a", str(first_token), "env-a", 0, 0),
        ("b", str(first_token + 3), "env-b", 2, 1),
        ("a", str(first_token + 4), "env-a", 0, 0),
    ]
    assert await client.hgetall(k.tokens) == {"a": str(first_token + 4), "b": str(first_token + 3)}
    assert sorted(await client.zrange(k.active, 0, -1)) == ["a", "b"]
    assert await client.hgetall(k.state) == {"a": "active", "b": "active", "big": "failed"}
    assert await client.zrange(k.failed, 0, -1) == ["big"]
    assert await client.hget(k.errors, "big") == "too-large"
    assert await client.hget(k.stats, "failed") == "1"
    # Without a size limit, a large envelope travels like any other.
    await s.add(("big2", "x" * 100, 0, 0))
    _, _, [(job_id, _, env, _, _)] = await s.claim(10)
    assert (job_id, env) == ("big2", "x" * 100)


async def test_claim_promotes_due_jobs_in_due_order(s: Scripts, client: aioredis.Redis, k: QueueKeys) -> None:
    """Due delayed jobs move to wait in due order, waiting, and are claimed in that order."""
    await s.add(*((f"d{n}", f"env-d{n}", LATER_MS, 0) for n in range(5)))
    await client.zadd(k.delayed, {"d3": 1, "d1": 2, "d4": 3})  # their time came
    nxt, left, jobs = await s.claim(2)
    assert [j[0] for j in jobs] == ["d3", "d1"]
    assert left == 1
    assert await client.hget(k.state, "d4") == "waiting"
    assert LATER_MS - 60_000 <= nxt <= LATER_MS
    assert sorted(await client.zrange(k.delayed, 0, -1)) == ["d0", "d2"]


async def test_claim_longer_than_one_chunk(s: Scripts, client: aioredis.Redis, k: QueueKeys) -> None:
    """A claim of 1,500 jobs leases every one with its own token."""
    await s.add(*((f"j{n}", f"env-j{n}", 0, 0) for n in range(500)))
    await s.add(*((f"j{n}", f"env-j{n}", 0, 0) for n in range(500, 1000)))
    await s.add(*((f"j{n}", f"env-j{n}", 0, 0) for n in range(1000, 1500)))
    _, left, jobs = await s.claim(1500)
    assert left == 0
    assert [j[0] for j in jobs] == [f"j{n}" for n in range(1500)]
    assert len({j[1] for j in jobs}) == 1500
    assert await client.zcard(k.active) == 1500
    assert await client.hgetall(k.tokens) == {j[0]: j[1] for j in jobs}
    assert set((await client.hgetall(k.state)).values()) == {"active"}
    flags = await s.complete([(j[0], j[1]) for j in jobs])
    assert flags == "1" * 1500
    assert await client.zcard(k.completed) == 1500
    assert await client.exists(k.active) == 0
    # Each completed job keeps its finishing delivery's token until trimmed (a resent ack is then recognised).
    assert await client.hgetall(k.tokens) == {j[0]: j[1] for j in jobs}


async def test_complete_batch_with_stale_expired_unknown_and_repeated_acks(
    s: Scripts, client: aioredis.Redis, k: QueueKeys
) -> None:
    """A complete of current, stale, expired, unknown and repeated acks records current ones, once each; the
    same delivery again is answered as recorded (as a resend after a lost reply would be), not stale."""
    await s.add(*((i, f"env-{i}", 0, 0) for i in ("a", "b", "c", "d", "e")))
    _, _, held = await s.claim(4)  # a b c d under long leases
    tokens = {j[0]: j[1] for j in held}
    _, _, [(_, e_token, *_)] = await s.claim(1, lease_ms=0)  # e: expired as soon as granted
    await client.hset(k.waiters, mapping={"b": "1", "c": "1", "e": "1"})  # b and e are awaited; c stays stale
    flags = await s.complete(
        [
            ("a", tokens["a"]),
            ("b", "999999"),  # a token that is not b's
            ("e", e_token),  # lease expired
            ("nope", "1"),  # no such job
            ("a", tokens["a"]),  # a again: completed earlier in this batch by this very delivery
            ("b", tokens["b"]),  # the current delivery of b, after a stale one
            ("d", tokens["d"]),
        ]
    )
    assert flags == "1000111"
    assert sorted(await client.zrange(k.completed, 0, -1)) == ["a", "b", "d"]
    assert await client.hgetall(k.results) == {
        "a": f"res-a-{tokens['a']}",
        "b": f"res-b-{tokens['b']}",
        "d": f"res-d-{tokens['d']}",
    }
    assert await client.hmget(k.state, ["a", "b", "c", "d", "e"]) == [
        "completed",
        "completed",
        "active",
        "completed",
        "active",
    ]
    assert sorted(await client.zrange(k.active, 0, -1)) == ["c", "e"]
    assert sorted(await client.hkeys(k.tokens)) == ["a", "b", "c", "d", "e"]  # a b d: kept until trimmed
    assert await client.hgetall(k.stats) == {"completed": "3", "stale_acks": "3"}
    # The awaited job that completed was notified and its waiter entry removed; the others were left alone.
    assert await client.hgetall(k.waiters) == {"c": "1", "e": "1"}
    assert await client.lrange(k.notify("b"), 0, -1) == ["completed"]
    assert 0 < await client.pttl(k.notify("b")) <= NOTIFY_TTL_MS
    for job_id in ("a", "c", "d", "e"):
        assert await client.exists(k.notify(job_id)) == 0


async def test_complete_with_no_waiters_and_a_whole_batch_stale(
    s: Scripts, client: aioredis.Redis, k: QueueKeys
) -> None:
    """A batch of only stale acks changes nothing but the stale count."""
    await s.add(("a", "env-a", 0, 0), ("b", "env-b", 0, 0))
    _, _, held = await s.claim(2)
    assert await s.complete([(job_id, "0") for job_id, *_ in held]) == "00"
    assert await client.hgetall(k.stats) == {"stale_acks": "2"}
    assert await client.zcard(k.active) == 2
    assert await client.exists(k.completed, k.results) == 0
    assert await s.complete([(job_id, token) for job_id, token, *_ in held], keep=1) == "11"
    assert await client.zcard(k.completed) == 1  # trimmed to the keep count, as before
