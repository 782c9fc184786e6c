"""Issue 12 items 4 and 5: one job's bad input fails that job alone, at ``add`` and once stored.

At ``add``: concurrent adds are coalesced into one script call (``AddBatcher``); a job that cannot be sent
must fail only its own caller, whether it is refused before it joins the batch (a ``job_id`` with no UTF-8
form) or breaks the batch's write itself. Once stored: an envelope whose options are out of range (written
by hand, or by another client) fails as a payload error; the worker and the jobs around it go on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

import qflow
from qflow import _codec
from qflow._adding import AddBatcher
from qflow._broker import scripts
from qflow._settings import MAX_SECONDS
from tests.integration.test_bad_input import assert_counts, failure_of, inject, running_worker


async def _stored_ids(q: qflow.Queue) -> set[str]:
    """Ids of every job stored in the queue's ``jobs`` hash."""
    return {_text(key) for key in await q.app.redis().hkeys(q.keys.jobs)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@pytest.mark.parametrize("bad_at", [0, 5, 10])
async def test_a_lone_surrogate_job_id_fails_only_its_own_add(app: qflow.App, bad_at: int) -> None:
    """Ten good adds and one with job_id "\\ud800", gathered: ten stored, that one raises PayloadError."""
    q = app.queue("iso")
    good_ids = [f"good-{i}" for i in range(10)]
    calls: list[Any] = [q.add("x", i, job_id=job_id) for i, job_id in enumerate(good_ids)]
    calls.insert(bad_at, q.add("x", "bad", job_id="\ud800"))

    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    bad = outcomes.pop(bad_at)
    assert isinstance(bad, qflow.PayloadError), repr(bad)
    assert "job_id '\\ud800' is not valid text" in str(bad)
    assert [o.id if isinstance(o, qflow.Job) else o for o in outcomes] == good_ids
    assert await _stored_ids(q) == set(good_ids)
    waiting = await app.redis().lrange(q.keys.wait, 0, -1)
    assert sorted(_text(i) for i in waiting) == sorted(good_ids)
    await assert_counts(q, waiting=10)


def _job(i: int) -> scripts.NewJob:
    return scripts.NewJob(
        f"good-{i}", _codec.encode_envelope(_codec.Envelope.of("x", b"\xc0", qflow.JobOptions()))
    )


UNSENDABLE = {
    # Made by hand, past Queue._prepare: what the batch's own write fails on, whatever the cause.
    "surrogate-id": scripts.NewJob("\ud800", b"\x92\xa1x\xc0"),
    "envelope-of-a-type-redis-refuses": scripts.NewJob("odd", {"not": "bytes"}),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("bad", UNSENDABLE.values(), ids=UNSENDABLE.keys())
async def test_a_job_that_breaks_its_batchs_write_fails_alone(app: qflow.App, bad: scripts.NewJob) -> None:
    """A job whose write fails inside a coalesced call fails only its own submit; the others are stored."""
    q = app.queue("iso")
    batcher = AddBatcher(q)
    jobs = [_job(i) for i in range(11)]
    jobs.insert(6, bad)  # the first submit goes out alone; the next eleven are sent together behind it

    outcomes = await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)

    failed = outcomes.pop(6)
    assert isinstance(failed, Exception), failed
    assert outcomes == [True] * 11  # each created
    assert await _stored_ids(q) == {f"good-{i}" for i in range(11)}
    await assert_counts(q, waiting=11)
    assert not batcher.busy
    assert not batcher.waiting


def _stored(**options: Any) -> bytes:
    """An envelope for the ``boom`` processor with these options, written as any msgpack client could."""
    fields = [options.get("attempts"), options.get("timeout"), options.get("backoff")]
    return _codec.encode(["boom", msgspec.Raw(b"\xc0"), *fields])


STORED_OUT_OF_RANGE = {
    "timeout-nan": ({"timeout": float("nan")}, "timeout"),
    "timeout-1e30": ({"timeout": 1e30}, "timeout"),
    "timeout-over-max": ({"timeout": MAX_SECONDS + 1}, "timeout"),
    "attempts-2**63": ({"attempts": 2**63}, "attempts"),
    "attempts-2**64-1": ({"attempts": 2**64 - 1}, "attempts"),
    "backoff-delay-1e306": (
        {"attempts": 3, "backoff": {"kind": "fixed", "delay": 1e306, "max_delay": 1e306}},
        "Backoff delay",
    ),
    "backoff-max-delay-inf": ({"attempts": 3, "backoff": {"max_delay": float("inf")}}, "Backoff max_delay"),
}


@pytest.mark.parametrize(("options", "field"), STORED_OUT_OF_RANGE.values(), ids=STORED_OUT_OF_RANGE.keys())
async def test_a_stored_job_with_an_out_of_range_option_fails_alone_as_payload(
    app: qflow.App, options: dict[str, Any], field: str
) -> None:
    """A stored envelope with a non-finite or out-of-range option fails as "payload" naming the field."""
    q = app.queue("stored")
    ran: list[str] = []

    @q.processor
    async def boom(job: qflow.Job[Any]) -> None:
        ran.append(job.id)
        raise ValueError("boom")

    @q.processor
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    async with running_worker(app):
        before = await q.add("echo", "before")
        bad = await inject(q, "stored-bad", _stored(**options))
        after = await q.add("echo", "after")
        assert await before.result(timeout=10) == "before"
        failed, kind = await failure_of(bad)
        assert await after.result(timeout=10) == "after"
        late = await q.add("echo", "late")  # added after the failure: the worker still takes jobs
        assert await late.result(timeout=10) == "late"

    assert (failed.error_type, kind) == ("PayloadError", "payload"), failed.message
    assert failed.message.startswith("job envelope cannot be decoded: ")
    assert field in failed.message, failed.message
    assert ran == []  # refused before its handler ran: no attempt spent on it
    await assert_counts(q, completed=3, failed=1)
    assert (await q.stats()).get("retried", 0) == 0
