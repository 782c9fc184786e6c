"""The app the cron fleet test runs as ``qflow worker tests.process.cron_app:app -p 4`` (issue 14).

Queue ``cron`` has one processor, ``tick``, declared with ``@queue.cron("* * * * * *")`` (schedule id
``every-second``, misfire ``run_once``): each worker process upserts it at start. Every run appends one line
``<job id> <pid> <host> <wall clock> <stalls>`` to ``$FLEET_LEDGER/<pid>.log`` with one ``os.write`` on an
``O_APPEND`` descriptor, so a SIGKILL loses no line that was written. ``CRON_HOST`` names the pretend host
(the supervisor) a process belongs to; the wall clock is the process's own ``time.time()``, skewed on a host
whose clock is wrong.

Configured like ``fleet_app`` (``FLEET_REDIS_URL``, ``FLEET_PREFIX``, ``FLEET_LEDGER``), so
``tests.process.fleet_app.Fleet`` starts and reaps it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import qflow

QUEUE = "cron"
DECLARED = "every-second"
SETTINGS = qflow.WorkerSettings(
    lease_ttl=1.0, check_interval=0.25, max_stalls=10, drain_timeout=5.0, block_timeout=0.5
)


def _record(line: str) -> None:
    directory = os.environ.get("FLEET_LEDGER")
    if not directory:
        return
    fd = os.open(Path(directory) / f"{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def build(url: str | None, prefix: str) -> qflow.App:
    """The app on ``url`` under ``prefix``, its ``tick`` processor run every second by declaration."""
    app = qflow.App(
        url,
        prefix=prefix,
        worker=SETTINGS,
        retention=qflow.RetentionSettings(completed_count=100_000, failed_count=100_000),
    )
    queue = app.queue(QUEUE)

    @queue.cron("* * * * * *", id=DECLARED, payload="declared")
    @queue.processor(concurrency=8)
    async def tick(job: qflow.Job[str]) -> int:
        """Record the run: which job (its id holds the tick), where, and this process's wall clock."""
        host = os.environ.get("CRON_HOST", "?")
        _record(f"{job.id} {os.getpid()} {host} {time.time():.3f} {job.stalls}")
        return os.getpid()

    return app


app = build(os.environ.get("FLEET_REDIS_URL"), os.environ.get("FLEET_PREFIX", "qflow"))
