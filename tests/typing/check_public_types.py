"""Type-only checks of the public API (run by mypy --strict; never executed by pytest)."""

from __future__ import annotations

from typing import Any, assert_type

import msgspec

import qflow

app = qflow.App("redis://127.0.0.1:6379/0")
email = app.queue("email")


class Welcome(msgspec.Struct):
    user_id: int


@email.processor(concurrency=5, timeout=30, attempts=3)
async def send_welcome(job: qflow.Job[Welcome]) -> str:
    assert_type(job.payload, Welcome)
    return "sent"


@email.processor
def crunch(job: qflow.Job[int]) -> float:
    return job.payload / 2


assert_type(send_welcome, qflow.Processor[Welcome, str])
assert_type(crunch, qflow.Processor[int, float])


@email.processor(options=qflow.JobOptions(attempts=5, backoff=qflow.Backoff(delay=2.0)))
async def with_options(job: qflow.Job[bytes]) -> None:
    assert_type(job.payload, bytes)


assert_type(with_options, qflow.Processor[bytes, None])


async def producer() -> None:
    job = await send_welcome.add(Welcome(user_id=42))
    assert_type(job, qflow.Job[Welcome])
    any_job = await email.add("send_welcome", {"user_id": 42})
    assert_type(any_job, qflow.Job[Any])
    assert_type(await any_job.status(), qflow.State | None)
    await send_welcome.add(42)  # type: ignore[arg-type]
    await send_welcome.add(Welcome(user_id=1), options=qflow.JobOptions(timeout=5.0), job_id="w-1")
    await send_welcome.add(Welcome(user_id=1), options={"timeout": 5.0})  # type: ignore[arg-type]
    await with_options.add(b"x", attempts=2, delay=1.0)
    assert_type(await email.add("crunch", 2, options=qflow.JobOptions(attempts=2)), qflow.Job[Any])
    # The deprecated alias keeps its types (it warns at run time).
    assert_type(await send_welcome.enqueue(Welcome(user_id=42)), qflow.Job[Welcome])
    resolved = qflow.JobOptions(attempts=3).over(send_welcome.options)
    assert_type(resolved.attempts, int)
    assert_type(resolved.timeout, float | None)
    assert_type(resolved.backoff, qflow.Backoff)


def errors(exc: Exception) -> None:
    if isinstance(exc, qflow.JobError):
        assert_type(exc.job_id, str | None)
    if isinstance(exc, qflow.JobFailed):
        assert_type(exc.job_id, str)
