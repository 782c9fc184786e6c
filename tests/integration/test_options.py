"""``JobOptions`` end to end: a processor's defaults, a job's overrides, the errors that name the job."""

from __future__ import annotations

import msgspec
import pytest

import qflow
from qflow import _codec
from qflow.testing import drain

NOW = qflow.Backoff(kind="fixed", delay=0.0)


async def test_processor_options_are_the_defaults_and_a_job_overrides_them(app: qflow.App) -> None:
    """``@processor(options=...)`` sets 3 attempts; ``add(options=...)`` gives one job 1, ``attempts=`` 2."""
    q = app.queue("opts")
    runs: dict[str, int] = {}

    @q.processor(options=qflow.JobOptions(attempts=3, backoff=NOW))
    async def flaky(job: qflow.Job[str]) -> None:
        runs[job.payload] = job.attempt
        raise RuntimeError("always")

    default = await flaky.add("default")
    once = await flaky.add("once", options=qflow.JobOptions(attempts=1))
    twice = await q.add("flaky", "twice", options=qflow.JobOptions(attempts=1), attempts=2)
    (bulk,) = await q.add_bulk([qflow.JobSpec("flaky", "bulk", options=qflow.JobOptions(attempts=2))])
    await drain(app, [q])
    assert runs == {"default": 3, "once": 1, "twice": 2, "bulk": 2}
    for job in (default, once, twice, bulk):
        with pytest.raises(qflow.JobFailed) as info:
            await job.result(timeout=1)
        assert info.value.job_id == job.id


async def test_the_stored_envelope_holds_only_the_jobs_overrides(app: qflow.App) -> None:
    """What a job sets is stored flat in its envelope; what it leaves to the processor is stored as nil."""
    q = app.queue("stored")

    @q.processor(attempts=5, timeout=10)
    async def noop(job: qflow.Job[int]) -> None: ...

    plain = await noop.add(1)
    custom = await noop.add(2, timeout=2.5, backoff=NOW)
    raw = await app.redis().hmget(q.keys.jobs, [plain.id, custom.id])
    envelopes = [_codec.decode_envelope(r) for r in raw]
    assert [e.options for e in envelopes] == [qflow.JobOptions(), qflow.JobOptions(timeout=2.5, backoff=NOW)]
    assert msgspec.msgpack.decode(raw[0])[2:] == [None, None, None]


async def test_result_errors_name_the_job(app: qflow.App) -> None:
    """``JobNotFound`` and ``ResultTimeout`` from ``Job.result`` carry the job's id (``JobError.job_id``)."""
    q = app.queue("errs")
    waiting = await q.add("nobody", 1)
    with pytest.raises(qflow.ResultTimeout) as late:
        await waiting.result(timeout=0.1)
    assert late.value.job_id == waiting.id
    with pytest.raises(qflow.JobNotFound) as missing:
        await q.job("never-added").result(timeout=1)
    assert missing.value.job_id == "never-added"
    with pytest.raises(qflow.ConfigurationError, match="timeout"):
        await waiting.result(timeout=float("nan"))
