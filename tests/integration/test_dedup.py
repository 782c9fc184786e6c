"""Deduplication modes (issue 14): ``add(dedup=qflow.Dedup(key, ttl, mode))``, throttle and debounce, with a
key of its own TTL in Redis, independent of retention."""

from __future__ import annotations

import asyncio
import time

import pytest

import qflow
from qflow.testing import drain


async def test_throttle_ignores_duplicates_within_the_ttl_and_returns_the_first_job(app: qflow.App) -> None:
    """Three adds with one key make one job; the later two are throttled and name it; the key has a TTL."""
    q = app.queue("thr")
    ran: list[int] = []

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        ran.append(job.payload)

    key = qflow.Dedup("user-7", ttl=60)
    jobs = [await work.add(i, dedup=key) for i in range(3)]
    assert [j.outcome for j in jobs] == [qflow.AddOutcome.CREATED] + [qflow.AddOutcome.THROTTLED] * 2
    assert {j.id for j in jobs} == {jobs[0].id}
    ttl = await app.redis().pttl(q.keys.dedup("user-7"))
    assert 0 < ttl <= 60_000
    await drain(app, [q])
    assert ran == [0]
    # Still throttled after the job finished (and even once retention trims it): the key decides.
    again = await work.add(9, dedup=key)
    assert (again.outcome, again.id) == (qflow.AddOutcome.THROTTLED, jobs[0].id)


async def test_throttle_lets_an_add_through_once_the_key_expired(app: qflow.App) -> None:
    """After the TTL, the key is gone and the next add creates a new job."""
    q = app.queue("thr-ttl")
    first = await q.add("work", 1, dedup=qflow.Dedup("k", ttl=0.05))
    deadline = time.monotonic() + 5
    while await app.redis().exists(q.keys.dedup("k")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    second = await q.add("work", 2, dedup=qflow.Dedup("k", ttl=0.05))
    assert second.outcome == qflow.AddOutcome.CREATED
    assert second.id != first.id


async def test_debounce_replaces_the_pending_payload_and_pushes_the_due_time(app: qflow.App) -> None:
    """Debounced adds keep one delayed job whose payload is the last one and whose due time moved later."""
    q = app.queue("deb")
    ran: list[int] = []

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        ran.append(job.payload)

    key = qflow.Dedup("doc-1", ttl=60, mode="debounce")
    first = await work.add(0, delay=30, dedup=key)
    due0 = await app.redis().zscore(q.keys.delayed, first.id)
    later = [await work.add(i, delay=31, dedup=key) for i in (1, 2)]
    assert [j.outcome for j in later] == [qflow.AddOutcome.DEBOUNCED] * 2
    assert {j.id for j in later} == {first.id}
    assert await app.redis().hlen(q.keys.jobs) == 1
    due1 = await app.redis().zscore(q.keys.delayed, first.id)
    assert due0 is not None
    assert due1 is not None
    assert due1 > due0
    # No delay now: the job becomes due at once, with the last payload.
    last = await work.add(3, dedup=key)
    assert (last.outcome, last.id) == (qflow.AddOutcome.DEBOUNCED, first.id)
    assert await first.status() == qflow.State.WAITING
    await drain(app, [q])
    assert ran == [3]


async def test_debounce_after_the_job_started_creates_a_new_one(app: qflow.App) -> None:
    """Once the key's job ran, a debounced add creates a new job and the key names it."""
    q = app.queue("deb-new")
    ran: list[int] = []

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        ran.append(job.payload)

    key = qflow.Dedup("k", ttl=60, mode="debounce")
    first = await work.add(1, dedup=key)
    await drain(app, [q])
    second = await work.add(2, dedup=key)
    assert second.outcome == qflow.AddOutcome.CREATED
    assert second.id != first.id
    assert await app.redis().get(q.keys.dedup("k")) == second.id.encode()
    await drain(app, [q])
    assert ran == [1, 2]


async def test_bulk_add_follows_the_same_rules_in_order(app: qflow.App) -> None:
    """In one ``add_bulk``, the second job with a key is throttled or debounced by the first; others add."""
    q = app.queue("deb-bulk")
    thr = qflow.Dedup("t", ttl=60)
    deb = qflow.Dedup("d", ttl=60, mode="debounce")
    jobs = await q.add_bulk(
        [
            qflow.JobSpec("work", 1, dedup=thr),
            qflow.JobSpec("work", 2),
            qflow.JobSpec("work", 3, dedup=thr),
            qflow.JobSpec("work", 4, dedup=deb, delay=10),
            qflow.JobSpec("work", 5, dedup=deb, delay=10),
        ]
    )
    outcomes = [j.outcome for j in jobs]
    created, throttled, debounced = (
        qflow.AddOutcome.CREATED,
        qflow.AddOutcome.THROTTLED,
        qflow.AddOutcome.DEBOUNCED,
    )
    assert outcomes == [created, created, throttled, created, debounced]
    assert jobs[2].id == jobs[0].id
    assert jobs[4].id == jobs[3].id
    assert await app.redis().hlen(q.keys.jobs) == 3
    info = await q.get_job(jobs[3].id)
    assert info.payload == 5


async def test_a_job_id_add_reports_whether_it_created_the_job(app: qflow.App) -> None:
    """A plain add says created; the same ``job_id`` again says exists."""
    q = app.queue("ids")
    assert (await q.add("work", 1, job_id="a")).outcome == qflow.AddOutcome.CREATED
    assert (await q.add("work", 1, job_id="a")).outcome == qflow.AddOutcome.EXISTS


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key": "", "ttl": 1}, "Dedup key"),
        ({"key": "k" * 257, "ttl": 1}, "Dedup key"),
        ({"key": "\ud800", "ttl": 1}, "UTF-8"),
        ({"key": "k", "ttl": 0}, "Dedup ttl"),
        ({"key": "k", "ttl": float("nan")}, "Dedup ttl"),
        ({"key": "k", "ttl": 1e300}, "Dedup ttl"),
        ({"key": "k", "ttl": 1, "mode": "sometimes"}, "Dedup mode"),
    ],
)
def test_a_bad_dedup_is_refused_when_made(kwargs: dict[str, object], match: str) -> None:
    """``Dedup`` checks its key, TTL and mode when made, naming what is wrong."""
    with pytest.raises(qflow.ConfigurationError, match=match):
        qflow.Dedup(**kwargs)  # type: ignore[arg-type]


async def test_a_dedup_key_of_the_wrong_type_writes_nothing(app: qflow.App) -> None:
    """A dedup key holding another type is reported as corrupt; no job is written."""
    q = app.queue("dd-corrupt")
    await app.redis().hset(q.keys.dedup("k"), "x", "1")
    with pytest.raises(qflow.CorruptQueue):
        await q.add("work", 1, dedup=qflow.Dedup("k", ttl=5))
    assert await app.redis().hlen(q.keys.jobs) == 0
