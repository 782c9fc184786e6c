"""A claim that brings a suspect keeps nothing else of that claim (tests/faults soak, seed 39694).

A job recovered after a crash (``stalls > 0``, a *suspect*) runs alone in its worker process, so that a
crash in that process charges no one else (docs/guarantees.md, "What a crashing job costs the others"). A
claim may bring a suspect together with fresh jobs: a fresh job can be a poison job that has not killed
anyone yet. If the worker started the fresh jobs of that claim while it held the suspect (and while the
other suspects of the claim were still on their way back to the queue), the poison's first death charged
all of them a second stall; a third fault then failed a healthy job as stalled, though it was in flight at
two faults only (the soak's "healthy job ... ended failed (stalled)").

Here one real claim brings [suspect S1, fresh poison P, suspect S2] to ``qflow worker -p 1 -c 4``: S1 is
held, P and S2 go back to the queue before anything of the claim starts; S1 and then S2 run alone and
complete, charged only their first stall; P kills its process on every delivery and fails as stalled.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis

import qflow
from tests.process import poison_app
from tests.process.fleet_app import Fleet

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals"),
    pytest.mark.timeout(120),
]

FINAL = {qflow.State.COMPLETED, qflow.State.FAILED}


@pytest.fixture
async def producer(redis_url: str, prefix: str) -> AsyncIterator[qflow.App]:
    """The producer side of ``poison_app``."""
    app = poison_app.build(redis_url, prefix)
    yield app
    await app.close()


async def test_a_claim_with_a_suspect_and_a_fresh_poison_charges_no_healthy_job_again(
    fleet: Fleet, producer: qflow.App, redis_url: str
) -> None:
    """One claim brings [S1 (stalls 1), P (fresh poison), S2 (stalls 1)]: S1 and S2 complete with 1 stall."""
    queue = producer.queues["mixed"]
    # Added before any worker runs, so the worker's first claim (8 free slots) brings all three, in order.
    s1 = await queue.add("ok", 0.1)
    poison = await queue.add("poison")
    s2 = await queue.add("ok", 0.1)
    direct = redis.Redis.from_url(redis_url)
    try:
        # Both healthy jobs were recovered once already (as after a worker's crash): they are suspects.
        direct.hset(queue.keys.stalls, mapping={s1.id: 1, s2.id: 1})
    finally:
        direct.close()
    sup = fleet.start("-p", "1", "-c", "4", "-q", "mixed", target=poison_app.TARGET)
    jobs = [s1, poison, s2]
    deadline = time.monotonic() + 60
    while not all([await job.status() in FINAL for job in jobs]):
        assert time.monotonic() < deadline, f"timed out waiting for the jobs to finish\n{sup.log()}"
        await asyncio.sleep(0.02)
    infos = {job.id: await queue.get_job(job.id) for job in jobs}
    summary = {i: (info.state.value, info.stalls) for i, info in infos.items()}
    led = fleet.ledger()
    for job in (s1, s2):
        info = infos[job.id]
        assert info.state == qflow.State.COMPLETED, f"healthy job {job.id} ended {info.state}: {summary}"
        assert info.stalls == 1, f"healthy job {job.id} charged another stall: {summary}"
        assert len(led.starts[job.id]) == 1, f"healthy job {job.id} ran more than once: {summary}"
    poisoned = infos[poison.id]
    assert poisoned.state == qflow.State.FAILED, summary
    assert poisoned.error is not None
    assert poisoned.error["kind"] == "stalled"
    assert len(led.starts[poison.id]) == poison_app.SETTINGS.max_stalls + 1, "one run per delivery"
    assert sup.popen.poll() is None, "the supervisor carried on"
