"""A claim script that fails on the server never ends the fetcher (issue 12, item 1, the fetcher's part).

Each test breaks a real key of the queue on a real server so that ``claim.lua`` answers an error, runs a
worker, and checks that the fetcher logs a WARNING naming the queue and the error, backs off (capped,
exponential, cut short by a stop), and claims again once the key is repaired.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest
import redis

import qflow
from qflow.exceptions import BrokerAuthError
from qflow.testing import FAST
from tests.support import running, wait_until

# Each corruption: the key of the queue it breaks, what it writes there, and the server's own error text
# (the scripts validate first and may answer their own error instead, naming the key).
CORRUPTIONS = {
    "delayed_wrong_type": ("delayed", "not-a-zset", "WRONGTYPE"),
    "active_wrong_type": ("active", "not-a-zset", "WRONGTYPE"),
    "seq_not_a_number": ("seq", "abc", "not an integer"),
}


def claim_warnings(caplog: pytest.LogCaptureFixture, queue: str) -> list[logging.LogRecord]:
    """The WARNING records the fetcher logged for failed claims on ``queue``."""
    return [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and f"claim on {queue} failed" in r.getMessage()
    ]


async def parked(app: qflow.App) -> bool:
    """True while some connection is blocked in the idle fetcher's ``BZPOPMIN``."""
    clients = await app.redis().client_list()
    return any(c.get("cmd") == "bzpopmin" and "b" in c.get("flags", "") for c in clients)


@asynccontextmanager
async def start_failing(
    app: qflow.App, q: qflow.Queue, key: str, bad: str, *, idle: bool
) -> AsyncIterator[asyncio.Task[None]]:
    """Run a worker whose claims on ``q`` fail because ``key`` holds ``bad``: with a job waiting before it
    starts (its first call is a plain claim), or, ``idle``, parked with a claim behind its wait when the job
    is pushed."""
    r = app.redis()
    settings = msgspec.structs.replace(FAST, claim_behind_wait=True)
    if not idle:
        await q.add("work", 1)
        await r.set(key, bad)
    async with running(qflow.Worker(app, settings=settings)) as run:
        if idle:
            await wait_until(lambda: parked(app), what="the idle fetcher to park", worker=run.task)
            await r.set(key, bad)
            await q.add("work", 1)
        yield run.task


@pytest.mark.parametrize("idle", [False, True], ids=["claim", "claim_behind_wait"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
async def test_claim_script_error_is_logged_and_the_worker_claims_again_after_repair(
    app: qflow.App, caplog: pytest.LogCaptureFixture, corruption: str, idle: bool
) -> None:
    """A claim failing on a corrupt key logs a WARNING (queue, error), pops nothing; the worker runs on."""
    q = app.queue("claim_errors")
    done: list[int] = []

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        done.append(job.payload)

    field, bad, error_text = CORRUPTIONS[corruption]
    key = getattr(q.keys, field)
    with caplog.at_level(logging.INFO, logger="qflow"):
        async with start_failing(app, q, key, bad, idle=idle) as task:
            await wait_until(lambda: claim_warnings(caplog, q.name), what="a claim warning", worker=task)
            for record in claim_warnings(caplog, q.name):
                message = record.getMessage()
                assert "CorruptQueue" in message
                # The server's error: redis' own, or a script's that names the corrupt key.
                assert error_text in message or key in message, message
            # The script failed before any write: the job is still waiting, and nothing ran.
            assert await app.redis().llen(q.keys.wait) == 1
            assert done == []
            await app.redis().delete(key)
            await q.add("work", 2)
            await wait_until(lambda: sorted(done) == [1, 2], what="both jobs to run", worker=task)
            assert not task.done()


@pytest.mark.parametrize("idle", [False, True], ids=["claim", "claim_behind_wait"])
async def test_failing_claims_back_off_and_leave_the_waiting_job_alone(
    app: qflow.App, caplog: pytest.LogCaptureFixture, idle: bool
) -> None:
    """Claims failing at the script's first command back off exponentially; the job waits, then runs."""
    q = app.queue("claim_backoff")
    done: list[int] = []

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        done.append(job.payload)

    with caplog.at_level(logging.INFO, logger="qflow"):
        async with start_failing(app, q, q.keys.delayed, "x", idle=idle) as task:
            await wait_until(
                lambda: len(claim_warnings(caplog, q.name)) >= 3, what="3 claim warnings", worker=task
            )
            warnings = claim_warnings(caplog, q.name)
            # 0.2 s then 0.4 s between them: backed off, not a busy loop of failing claims.
            assert warnings[2].created - warnings[0].created >= 0.5
            assert "retrying in 0.2s" in warnings[0].getMessage()
            assert "retrying in 0.8s" in warnings[2].getMessage()
            # The script failed before any write: the job is still waiting, and nothing ran.
            assert await app.redis().llen(q.keys.wait) == 1
            assert done == []
            await app.redis().delete(q.keys.delayed)
            await wait_until(lambda: done == [1], what="the waiting job to run after the repair", worker=task)


async def test_stop_interrupts_the_claim_backoff(app: qflow.App, caplog: pytest.LogCaptureFixture) -> None:
    """A stop during the fetcher's backoff after failed claims ends the worker at once, not later."""
    q = app.queue("claim_backoff_stop")

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        return None

    await q.add("work", 1)
    await app.redis().set(q.keys.delayed, "not-a-zset")
    worker = qflow.Worker(app, settings=FAST)
    with caplog.at_level(logging.INFO, logger="qflow"):
        task = asyncio.create_task(worker.run())
        try:
            # After the 4th failure the fetcher backs off for 1.6 s.
            await wait_until(
                lambda: len(claim_warnings(caplog, q.name)) >= 4, what="4 claim warnings", worker=task
            )
            assert not task.done()
            t0 = time.monotonic()
            worker.stop()
            await asyncio.wait_for(task, 5)
            assert time.monotonic() - t0 < 1.0
        finally:
            if not task.done():
                worker.stop(fast=True)
                await asyncio.wait_for(task, 15)


async def test_a_claim_refused_by_an_acl_ends_the_worker_with_broker_auth_error(
    redis_url: str, prefix: str
) -> None:
    """A permission revoked while the worker runs is not retried forever: it ends with BrokerAuthError."""
    user = f"{prefix}-user"
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", user, "on", "nopass", "~*", "&*", "+@all")
    parts = urlsplit(redis_url)
    url = urlunsplit(parts._replace(netloc=f"{user}:x@{parts.hostname}:{parts.port}"))
    app = qflow.App(url, prefix=prefix, worker=FAST)
    q = app.queue("acl_revoked")

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        return None

    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 5)
        admin.execute_command("ACL", "SETUSER", user, "-evalsha", "-eval")
        async with qflow.App(redis_url, prefix=prefix) as producer:
            await producer.queue("acl_revoked").add("work", 1)
        with pytest.raises(BrokerAuthError):
            await asyncio.wait_for(task, 10)
    finally:
        if not task.done():
            worker.stop(fast=True)
            await asyncio.wait_for(task, 15)
        await app.close()
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
