"""A poison job does not take healthy jobs down with it (issue 12, item 3).

``qflow worker tests.process.poison_app:app -p 1 -c 4``, a real supervisor and real worker processes: one
job SIGKILLs its process on every delivery, the others sleep briefly and never raise. Recovery puts the
jobs of a dead worker back together; a recovered job (``stalls > 0``) then runs alone in its process, so
only the poison job dies again. Every healthy job must end completed, charged at most the one stall of the
first crash (when it was running beside the poison job, before anything was known), and the poison job
alone fails, as stalled, after ``max_stalls`` recoveries.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import qflow
from tests.process import poison_app
from tests.process.fleet_app import Fleet, Supervised

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals"),
    pytest.mark.timeout(120),
]


FINAL = {qflow.State.COMPLETED, qflow.State.FAILED}


async def until(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, what: str, sup: Supervised
) -> None:
    """Poll the async ``predicate`` every 20 ms until it holds; fail with the supervisor's log on timeout."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{sup.log()}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def producer(redis_url: str, prefix: str) -> AsyncIterator[qflow.App]:
    """The producer side of ``poison_app``."""
    app = poison_app.build(redis_url, prefix)
    yield app
    await app.close()


@pytest.mark.parametrize("layout", ["one_queue", "two_queues"])
async def test_a_poison_job_fails_alone_and_every_healthy_job_completes(
    fleet: Fleet, producer: qflow.App, layout: str
) -> None:
    """-p 1 -c 4, a job SIGKILLs its worker among healthy ones: only it fails (stalled); the rest complete."""
    mixed, side = (producer.queues[name] for name in poison_app.QUEUES)
    healthy_queue = mixed if layout == "one_queue" else side
    sup = fleet.start("-p", "1", "-c", "4", target=poison_app.TARGET)
    await sup.wait_ready(1)
    # The poison job among the first four claimed, so healthy jobs run beside it on the first delivery.
    healthy = [await healthy_queue.add("ok", 0.3) for _ in range(3)]
    poison = await mixed.add("poison")
    healthy += [await healthy_queue.add("ok", 0.3) for _ in range(5)]
    jobs = [*healthy, poison]

    async def finished() -> bool:
        states = [await job.status() for job in jobs]
        return all(s in FINAL for s in states)

    await until(finished, timeout=60, what="every job to finish", sup=sup)
    infos = {job.id: await (mixed if job is poison else healthy_queue).get_job(job.id) for job in jobs}
    summary = {i: (info.state.value, info.stalls) for i, info in infos.items()}
    for job in healthy:
        info = infos[job.id]
        assert info.state == qflow.State.COMPLETED, f"healthy job {job.id} ended {info.state}: {summary}"
        assert info.stalls <= 1, f"healthy job {job.id} charged {info.stalls} stalls: {summary}"
    poisoned = infos[poison.id]
    assert poisoned.state == qflow.State.FAILED
    assert poisoned.error is not None
    assert poisoned.error["kind"] == "stalled"
    assert poisoned.stalls == poison_app.SETTINGS.max_stalls + 1
    led = fleet.ledger()
    assert len(led.starts[poison.id]) == poison_app.SETTINGS.max_stalls + 1, "one run per delivery"
    assert sup.popen.poll() is None, "the supervisor carried on"
