"""The broker's calls that do not go out alone (a pipeline, a claim behind a blocking wait) survive a server
that forgot its scripts: each one's NOSCRIPT goes through the broker's single fallback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from qflow._broker import scripts
from qflow._broker.keys import QueueKeys

LONG_MS = 60_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client with raw replies, as qflow's own."""
    c = aioredis.Redis.from_url(redis_url, socket_timeout=10)
    yield c
    await c.aclose()


async def test_claim_behind_a_wait_runs_from_source_after_script_flush(
    client: aioredis.Redis, prefix: str
) -> None:
    """With a job waiting and no scripts on the server, the claim behind the wait still leases the job."""
    k = QueueKeys(prefix, "behind")
    assert await scripts.add(client, k, [scripts.NewJob("j1", b"env-1")]) == [True]
    await client.script_flush()
    parked: list[int] = []
    out = await scripts.wait_then_claim(
        client, k, timeout=2.0, parked=parked.append, count=1, lease_ms=LONG_MS
    )
    assert out.failed is None
    assert out.reply is not None
    assert [(j.id, j.envelope) for j in out.reply.jobs] == [(b"j1", b"env-1")]
    assert len(parked) == 1
    assert isinstance(parked[0], int)
    assert await client.hget(k.state, "j1") == b"active"


async def test_claim_behind_a_wait_that_times_out_claims_nothing(client: aioredis.Redis, prefix: str) -> None:
    """An empty queue: the wait ends by its timeout and the claim behind it returns no job."""
    k = QueueKeys(prefix, "idle")
    out = await scripts.wait_then_claim(
        client, k, timeout=0.05, parked=lambda _: None, count=1, lease_ms=LONG_MS
    )
    assert out == scripts.Parked(scripts.ClaimReply(-1, 0, []))


async def test_renewal_of_several_queues_after_script_flush(client: aioredis.Redis, prefix: str) -> None:
    """One pipelined renewal of two queues on a server without the script: each is renewed, lost ids named."""
    a, b = QueueKeys(prefix, "a"), QueueKeys(prefix, "b")
    held = []
    for k in (a, b):
        await scripts.add(client, k, [scripts.NewJob("j1", b"env")])
        [job] = (await scripts.claim(client, k, count=1, lease_ms=1_000)).jobs
        held.append((job.id, job.token))
    await client.script_flush()
    lost = await scripts.renew_all(
        client, [(a, [held[0]]), (b, [held[1], (b"ghost", b"1")])], lease_ms=LONG_MS
    )
    assert lost == [[], [b"ghost"]]
    for k in (a, b):
        deadline = await client.zscore(k.active, "j1")
        assert deadline is not None
        assert deadline - await server_ms(client) > LONG_MS - 10_000


async def server_ms(client: aioredis.Redis) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000
