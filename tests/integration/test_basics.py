"""The contract of issue #2's example: add by name, typed twin (processor.add), result, status."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

import qflow
from qflow._broker import scripts
from qflow.testing import drain


class Welcome(msgspec.Struct):
    user_id: int


async def test_add_by_name_runs_typed_processor_and_returns_result(app: qflow.App) -> None:
    """A job added by name reaches a typed processor as a validated Struct; its result comes back."""
    email = app.queue("email")
    seen: list[Welcome] = []

    @email.processor(concurrency=5, timeout=30, attempts=3)
    async def send_welcome(job: qflow.Job[Welcome]) -> str:
        seen.append(job.payload)
        return f"sent {job.payload.user_id}"

    job = await email.add("send_welcome", {"user_id": 42})
    assert await job.status() == qflow.State.WAITING
    worker = asyncio.create_task(app.run_worker(burst=True))
    assert await job.result(timeout=10) == "sent 42"
    await worker
    assert seen == [Welcome(user_id=42)]
    assert await job.status() == qflow.State.COMPLETED


async def test_typed_enqueue_twin(app: qflow.App) -> None:
    """``processor.add`` takes the payload Struct and returns a job handle with the same payload."""
    q = app.queue("email")

    @q.processor
    async def send_welcome(job: qflow.Job[Welcome]) -> int:
        return job.payload.user_id * 2

    job = await send_welcome.add(Welcome(user_id=21))
    assert job.payload == Welcome(user_id=21)
    assert job.name == "send_welcome"
    await drain(app)
    assert await job.result(timeout=5) == 42


async def test_untyped_processor_gets_plain_data(app: qflow.App) -> None:
    """A processor without a payload annotation receives the decoded payload as plain data."""
    q = app.queue("plain")
    got: list[object] = []

    @q.processor(name="echo")
    async def handler(job):  # type: ignore[no-untyped-def]
        got.append(job.payload)
        return job.payload

    await q.add("echo", {"a": [1, 2, {"b": None}]})
    await drain(app)
    assert got == [{"a": [1, 2, {"b": None}]}]


async def test_sync_processor_runs_off_the_event_loop(app: qflow.App) -> None:
    """A plain ``def`` processor runs in a thread, never on the event loop's thread."""
    import threading

    q = app.queue("cpu")
    loop_thread = threading.get_ident()
    threads: list[int] = []

    @q.processor(concurrency=2)
    def crunch(job: qflow.Job[int]) -> int:
        threads.append(threading.get_ident())
        return sum(range(job.payload))

    job = await q.add("crunch", 1000)
    await drain(app)
    assert await job.result(timeout=5) == sum(range(1000))
    assert threads
    assert all(t != loop_thread for t in threads)


async def test_declaring_does_no_io_and_starts_nothing() -> None:
    """Building an App, a queue and a processor with an unreachable URL performs no I/O and starts no task."""
    before = len(asyncio.all_tasks())
    app = qflow.App("redis://127.0.0.1:1/0")
    q = app.queue("x")

    @q.processor(concurrency=3)
    async def f(job: qflow.Job[int]) -> None:
        return None

    assert len(asyncio.all_tasks()) == before
    assert q.processors["f"].concurrency == 3


async def test_result_timeout_when_no_worker(app: qflow.App) -> None:
    """``result(timeout=)`` raises ResultTimeout (a TimeoutError) when nobody runs the job."""
    q = app.queue("idle")
    job = await q.add("anything", 1)
    with pytest.raises(qflow.ResultTimeout):
        await job.result(timeout=0.2)
    assert await job.status() == qflow.State.WAITING


async def test_result_of_unknown_job_raises_not_found(app: qflow.App) -> None:
    """Waiting on an id that was never added raises JobNotFound, not a hang."""
    q = app.queue("idle")
    with pytest.raises(qflow.JobNotFound):
        await q.job("nope").result(timeout=1)
    assert await q.job("nope").status() is None


async def test_concurrent_adds_are_coalesced_into_few_script_calls(
    app: qflow.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 coroutines adding at once need far fewer than 200 add-script calls, and every job exists."""
    q = app.queue("burst")
    calls: list[int] = []
    real = q._run_add

    async def counting(jobs: list[scripts.NewJob]) -> list[bool]:
        calls.append(len(jobs))
        return await real(jobs)

    monkeypatch.setattr(q, "_run_add", counting)
    jobs = await asyncio.gather(*(q.add("x", i) for i in range(200)))
    assert sum(calls) == 200
    assert len(calls) < 20
    assert await app.redis().llen(q.keys.wait) == 200
    assert {j.id for j in jobs} == {i.decode() for i in await app.redis().lrange(q.keys.wait, 0, -1)}


async def test_a_lone_add_is_one_script_call(app: qflow.App, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential adds each go out at once, one script call per add."""
    q = app.queue("single")
    calls: list[int] = []
    real = q._run_add

    async def counting(jobs: list[scripts.NewJob]) -> list[bool]:
        calls.append(len(jobs))
        return await real(jobs)

    monkeypatch.setattr(q, "_run_add", counting)
    for i in range(5):
        await q.add("x", i)
    assert calls == [1, 1, 1, 1, 1]
