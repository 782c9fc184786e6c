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


async def producer() -> None:
    job = await send_welcome.enqueue(Welcome(user_id=42))
    assert_type(job, qflow.Job[Welcome])
    any_job = await email.add("send_welcome", {"user_id": 42})
    assert_type(any_job, qflow.Job[Any])
    assert_type(await any_job.status(), qflow.State | None)
    await send_welcome.enqueue(42)  # type: ignore[arg-type]
