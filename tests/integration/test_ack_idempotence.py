"""A resent ack of the delivery that recorded a job's outcome is answered as recorded (DESIGN.md guarantee 3).

The reply to a worker's complete or fail can be lost after the server ran the script (a dropped connection, a
socket timeout): the worker sends the same ack again (``acks.with_retries``). complete.lua and fail.lua keep
the fencing token of the delivery that finished a job in ``tokens`` (retention trims it with the job), so the
resend is told apart from a stale ack: this ack's token stored for a job in the state this ack records means
the outcome is already this delivery's. The resend is answered as recorded ('1' / 1), writes nothing and
counts nothing. An ack of any other delivery (an older token, whose lease expired and whose job another
delivery finished since) is stale as before: rejected and counted in ``stats.stale_acks``.

tests/faults/test_network_faults.py (``test_lost_reply_on_an_ack_*``) drives the same through a worker and a
proxy that loses the reply; tests/integration/test_lifecycle_stateful.py models it among every other script.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from qflow._broker import scripts
from qflow._broker.keys import QueueKeys

LONG_MS = 60_000
NOTIFY_TTL_MS = 60_000
KEEP = 100_000


class Queue:
    """One queue's lifecycle scripts on its real key names, through the broker's typed functions."""

    def __init__(self, raw: aioredis.Redis, text: aioredis.Redis, k: QueueKeys) -> None:
        self.raw = raw  # claim's reply is packed bytes
        self.text = text
        self.k = k

    async def add(self, *ids: str) -> None:
        assert await scripts.add(self.raw, self.k, [scripts.NewJob(i, f"env-{i}") for i in ids]) == [
            True
        ] * len(ids)

    async def claim(self, count: int, lease_ms: int = LONG_MS) -> dict[str, str]:
        """Lease up to ``count`` waiting jobs; their tokens by id."""
        res = await scripts.claim(self.raw, self.k, count=count, lease_ms=lease_ms)
        return {j.id.decode(): j.token.decode() for j in res.jobs}

    async def complete(self, acks: list[tuple[str, str, str]], keep: int = KEEP) -> str:
        """(id, token, result) per ack; one character per ack as complete.lua answers ('1' recorded)."""
        flags = await scripts.complete(
            self.raw, self.k, acks, keep_count=keep, keep_age_ms=-1, notify_ttl_ms=NOTIFY_TTL_MS
        )
        return "".join("1" if ok else "0" for ok in flags)

    async def fail(self, job_id: str, token: str, error: str, keep: int = KEEP) -> bool:
        return await scripts.fail(
            self.raw,
            self.k,
            job_id,
            token,
            error.encode(),
            spent=True,
            keep_count=keep,
            keep_age_ms=-1,
            notify_ttl_ms=NOTIFY_TTL_MS,
        )

    async def recover(self, max_stalls: int = 5, keep: int = KEEP) -> scripts.Recovered | None:
        await self.text.delete(self.k.checker)  # a new check interval
        return await scripts.recover(
            self.raw,
            self.k,
            checker="test",
            lock_ms=LONG_MS,
            max_stalls=max_stalls,
            stalled_error=b"stalled",
            keep_count=keep,
            keep_age_ms=-1,
        )

    async def redeliver(self, job_id: str) -> tuple[str, str]:
        """Deliver a waiting job under a lease that expires at once, recover it, deliver it again: (the older
        token, the current one). The older delivery's acks are then stale."""
        older = await self.claim(1, lease_ms=0)
        assert list(older) == [job_id]
        recovered = await self.recover()
        assert recovered is not None
        assert recovered.requeued == 1
        current = await self.claim(1)
        assert list(current) == [job_id]
        return older[job_id], current[job_id]

    async def dump(self) -> dict[str, Any]:
        """Every structure of the queue, and the notify list of each job, read in one MULTI/EXEC."""
        k = self.k
        notify = sorted([key async for key in self.text.scan_iter(match=k.notify("*"), count=1000)])
        hashes = ("jobs", "state", "tokens", "attempts", "stalls", "results", "errors", "waiters", "stats")
        zsets = ("active", "delayed", "completed", "failed")
        async with self.text.pipeline(transaction=True) as p:
            p.lrange(k.wait, 0, -1)
            for name in zsets:
                p.zrange(getattr(k, name), 0, -1, withscores=True)
            for name in hashes:
                p.hgetall(getattr(k, name))
            for key in notify:
                p.lrange(key, 0, -1)
            replies = await p.execute()
        return dict(zip(["wait", *zsets, *hashes, *notify], replies, strict=True))


@pytest.fixture
async def q(redis_url: str, prefix: str) -> AsyncIterator[Queue]:
    raw = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    text = aioredis.Redis.from_url(redis_url, socket_timeout=10, decode_responses=True)
    yield Queue(raw, text, QueueKeys(prefix, "acks"))
    await raw.aclose()
    await text.aclose()


# -- complete -----------------------------------------------------------------------------------------------


async def test_complete_sent_again_by_the_same_delivery_is_recorded_once(q: Queue) -> None:
    """The lost reply's resend: answered '1', nothing written (the result, the completion time, the waiter's
    one wake-up stay the first call's), nothing counted."""
    await q.add("a")
    tokens = await q.claim(1)
    await q.text.hset(q.k.waiters, "a", "1")  # awaited: complete pushes one wake-up
    assert await q.complete([("a", tokens["a"], "first")]) == "1"
    first = await q.dump()
    assert first["state"] == {"a": "completed"}
    assert first["results"] == {"a": "first"}
    assert first["stats"] == {"completed": "1"}
    assert first[q.k.notify("a")] == ["completed"]
    # The resend carries the same delivery; its result would be the same, a different one shows no write.
    assert await q.complete([("a", tokens["a"], "second")]) == "1"
    assert await q.complete([("a", tokens["a"], "third")]) == "1"
    assert await q.dump() == first
    assert first["tokens"] == {"a": tokens["a"]}, "the finishing delivery's token is kept with the job"


async def test_a_batch_sent_again_is_recorded_once_beside_new_and_stale_acks(q: Queue) -> None:
    """A resent batch (the acker's retry) answers '1' for each of its jobs; new acks in the same call are
    recorded, stale ones rejected and counted, as when each ack ran alone."""
    await q.add("a", "b", "c", "d")
    held = await q.claim(3)  # a b c under long leases
    assert await q.complete([("a", held["a"], "res-a"), ("b", held["b"], "res-b")]) == "11"
    older_d, current_d = await q.redeliver("d")
    flags = await q.complete(
        [
            ("a", held["a"], "res-a"),  # resent
            ("c", held["c"], "res-c"),  # new
            ("d", older_d, "late"),  # an older delivery of d: stale
            ("b", held["b"], "res-b"),  # resent
            ("c", held["c"], "res-c"),  # c again: completed by this very delivery earlier in the batch
            ("d", current_d, "res-d"),  # the current delivery of d
            ("a", "999999", "forged"),  # a token that never finished a
        ]
    )
    assert flags == "1101110"
    dump = await q.dump()
    assert dump["results"] == {"a": "res-a", "b": "res-b", "c": "res-c", "d": "res-d"}
    assert dump["stats"] == {"completed": "4", "stale_acks": "2", "stalled": "1"}
    assert dump["tokens"] == {"a": held["a"], "b": held["b"], "c": held["c"], "d": current_d}
    assert dump["active"] == []


async def test_complete_from_an_older_delivery_after_another_completed_the_job_is_stale(q: Queue) -> None:
    """The older delivery's lease expired, the job ran again and completed: its late complete is rejected and
    counted, and the recorded outcome stays the current delivery's."""
    await q.add("a")
    older, current = await q.redeliver("a")
    assert await q.complete([("a", current, "current")]) == "1"
    before = await q.dump()
    assert await q.complete([("a", older, "late")]) == "0"
    after = await q.dump()
    assert after["stats"] == {**before["stats"], "stale_acks": "1"}
    assert {**after, "stats": before["stats"]} == before
    assert after["results"] == {"a": "current"}


async def test_an_expired_lease_still_held_is_stale_not_recorded(q: Queue) -> None:
    """The token is still the job's but its lease expired (not recovered yet): the job is active, not
    completed, so the ack is stale as before."""
    await q.add("a")
    tokens = await q.claim(1, lease_ms=0)
    assert await q.complete([("a", tokens["a"], "late")]) == "0"
    assert not await q.fail("a", tokens["a"], "late")
    dump = await q.dump()
    assert dump["state"] == {"a": "active"}
    assert dump["stats"] == {"stale_acks": "2"}


# -- fail ---------------------------------------------------------------------------------------------------


async def test_fail_sent_again_by_the_same_delivery_is_recorded_once(q: Queue) -> None:
    """The lost reply's resend: True, nothing written (the error, the attempt spent, the waiter's one wake-up
    stay the first call's), nothing counted."""
    await q.add("a")
    tokens = await q.claim(1)
    await q.text.hset(q.k.waiters, "a", "1")
    assert await q.fail("a", tokens["a"], "first") is True
    first = await q.dump()
    assert first["state"] == {"a": "failed"}
    assert first["errors"] == {"a": "first"}
    assert first["attempts"] == {"a": "1"}
    assert first["stats"] == {"failed": "1"}
    assert first[q.k.notify("a")] == ["failed"]
    assert await q.fail("a", tokens["a"], "second") is True
    assert await q.fail("a", tokens["a"], "third") is True
    assert await q.dump() == first
    assert first["tokens"] == {"a": tokens["a"]}, "the finishing delivery's token is kept with the job"


async def test_fail_from_an_older_delivery_after_another_failed_the_job_is_stale(q: Queue) -> None:
    await q.add("a")
    older, current = await q.redeliver("a")
    assert await q.fail("a", current, "current") is True
    before = await q.dump()
    assert await q.fail("a", older, "late") is False
    after = await q.dump()
    assert after["stats"] == {**before["stats"], "stale_acks": "1"}
    assert {**after, "stats": before["stats"]} == before
    assert after["errors"] == {"a": "current"}


async def test_the_other_outcome_from_the_finishing_delivery_is_stale(q: Queue) -> None:
    """Only the outcome recorded is recognised: a fail from the delivery that completed a job (or the other
    way round) is not a resend of it, and is rejected and counted."""
    await q.add("a", "b")
    tokens = await q.claim(2)
    assert await q.complete([("a", tokens["a"], "res-a")]) == "1"
    assert await q.fail("b", tokens["b"], "err-b") is True
    before = await q.dump()
    assert await q.fail("a", tokens["a"], "late") is False
    assert await q.complete([("b", tokens["b"], "late")]) == "0"
    after = await q.dump()
    assert after["stats"] == {**before["stats"], "stale_acks": "2"}
    assert {**after, "stats": before["stats"]} == before


async def test_a_failed_job_requeued_by_an_operator_is_not_recorded_for_its_old_delivery(q: Queue) -> None:
    """retry_failed leaves the old token; the old delivery's resent fail finds the job waiting, not failed:
    stale. The next claim replaces the token."""
    await q.add("a")
    first = await q.claim(1)
    assert await q.fail("a", first["a"], "boom") is True
    assert await scripts.retry_failed(q.raw, q.k, ["a"]) == [1]
    assert await q.fail("a", first["a"], "late") is False
    assert (await q.dump())["stats"] == {"failed": "1", "requeued": "1", "stale_acks": "1"}
    second = await q.claim(1)
    assert await q.text.hgetall(q.k.tokens) == {"a": second["a"]}
    assert await q.complete([("a", second["a"], "ok")]) == "1"
    assert await q.fail("a", first["a"], "late") is False


# -- retention: the kept token goes with its job ------------------------------------------------------------


async def test_complete_trims_the_kept_tokens_of_the_jobs_it_trims(q: Queue) -> None:
    """No leak: once retention trimmed a completed job, its token is gone with it; ``tokens`` holds the
    active jobs' tokens and those of the finished jobs kept."""
    await q.add("a", "b", "c", "d")
    tokens = await q.claim(4)
    assert await q.complete([("a", tokens["a"], "r")], keep=1) == "1"
    assert await q.complete([("b", tokens["b"], "r")], keep=1) == "1"  # trims a
    assert await q.text.hgetall(q.k.tokens) == {i: tokens[i] for i in ("b", "c", "d")}
    assert await q.complete([("c", tokens["c"], "r")], keep=0) == "1"  # trims b and c
    assert await q.text.hgetall(q.k.tokens) == {"d": tokens["d"]}, "only the active job's token is left"
    assert await q.text.hgetall(q.k.state) == {"d": "active"}


async def test_fail_trims_the_kept_tokens_of_the_jobs_it_trims(q: Queue) -> None:
    await q.add("a", "b", "c")
    tokens = await q.claim(3)
    assert await q.fail("a", tokens["a"], "e", keep=1) is True
    assert await q.fail("b", tokens["b"], "e", keep=1) is True  # trims a
    assert await q.text.hgetall(q.k.tokens) == {"b": tokens["b"], "c": tokens["c"]}
    assert await q.fail("c", tokens["c"], "e", keep=0) is True  # trims b and c
    assert await q.text.hgetall(q.k.tokens) == {}
    assert await q.text.hgetall(q.k.state) == {}


async def test_recover_trims_the_kept_tokens_of_the_failed_jobs_it_trims(q: Queue) -> None:
    """recover fails a stalled job and trims the failed set: a job fail.lua failed goes, its token too."""
    await q.add("a", "b")
    first = await q.claim(1)
    assert await q.fail("a", first["a"], "e") is True
    await q.claim(1, lease_ms=0)  # b: its worker dies at once
    recovered = await q.recover(max_stalls=0, keep=1)  # b fails as stalled; a is trimmed
    assert recovered is not None
    assert recovered.failed == 1
    assert await q.text.zrange(q.k.failed, 0, -1) == ["b"]
    assert await q.text.hgetall(q.k.tokens) == {}


async def test_a_resend_after_its_job_was_trimmed_is_stale(q: Queue) -> None:
    """The limit of the design: once retention trimmed the job (keep count 0, or more jobs finished in
    between than it keeps), nothing tells the resend from a stale ack; it is counted, and changes nothing."""
    await q.add("a")
    tokens = await q.claim(1)
    assert await q.complete([("a", tokens["a"], "r")], keep=0) == "1"
    assert await q.complete([("a", tokens["a"], "r")], keep=0) == "0"
    dump = await q.dump()
    assert dump["stats"] == {"completed": "1", "stale_acks": "1"}
    assert dump["state"] == dump["tokens"] == dump["jobs"] == {}
