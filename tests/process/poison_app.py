"""The app the poison tests run as ``qflow worker tests.process.poison_app:app`` (issue 12, item 3).

Configured as ``fleet_app`` is (``FLEET_REDIS_URL``, ``FLEET_PREFIX``, ``FLEET_LEDGER``: see there), so the
tests start it with ``fleet_app.Fleet(...).start(..., target=TARGET)``. Two queues, each with:

- ``poison``: SIGKILLs its own worker process on every delivery (a segfaulting C extension, an OOM kill);
- ``ok``: a healthy job that sleeps ``payload`` seconds on the event loop and never raises.

Worker timings are short (a dead worker's jobs are runnable again within about 1.25 s) and ``max_stalls`` is
2, so the poison job fails as stalled on its third death. Every run appends ``start <id> <attempt> <stalls>``
(and ``end <id>``) to the process's ledger file, as ``fleet_app`` does.
"""

from __future__ import annotations

import asyncio
import os
import signal

import qflow
from tests.process.fleet_app import _record

SETTINGS = qflow.WorkerSettings(
    lease_ttl=1.0, check_interval=0.25, max_stalls=2, drain_timeout=5.0, block_timeout=0.5
)
QUEUES = ("mixed", "side")
TARGET = "tests.process.poison_app:app"


def build(url: str | None, prefix: str) -> qflow.App:
    """The app with its processors, on ``url`` under ``prefix`` (finished jobs are all kept)."""
    app = qflow.App(
        url,
        prefix=prefix,
        worker=SETTINGS,
        retention=qflow.RetentionSettings(completed_count=100_000, failed_count=100_000),
    )
    for name in QUEUES:
        queue = app.queue(name)

        @queue.processor(name="poison")
        async def poison(job: qflow.Job[None]) -> None:
            """Kill this worker process, every time the job is delivered."""
            _record(f"start {job.id} {job.attempt} {job.stalls}")
            os.kill(os.getpid(), signal.SIGKILL)

        @queue.processor(name="ok")
        async def ok(job: qflow.Job[float]) -> int:
            """Sleep ``payload`` seconds; never fail."""
            _record(f"start {job.id} {job.attempt} {job.stalls}")
            await asyncio.sleep(job.payload)
            _record(f"end {job.id}")
            return os.getpid()

    return app


app = build(os.environ.get("FLEET_REDIS_URL"), os.environ.get("FLEET_PREFIX", "qflow"))
