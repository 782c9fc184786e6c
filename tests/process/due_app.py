"""The app of ``tests/process/test_idle_fleet.py``, run as ``qflow worker tests.process.due_app:app -p N``.

Default ``WorkerSettings`` (block_timeout 2 s): the figures are those of an untuned fleet. Configured by the
environment variables of ``tests.process.fleet_app.Fleet`` (``FLEET_REDIS_URL``, ``FLEET_PREFIX``,
``FLEET_LEDGER``). The ``tick`` processor reads the server's clock first thing (``TIME``) and appends
``<job id> <start, server ms>`` to ``<FLEET_LEDGER>/<pid>.due``, one ``os.write`` per line.
"""

from __future__ import annotations

import os
from pathlib import Path

import qflow
from qflow._broker import commands

QUEUE = "due"


def build(url: str, prefix: str) -> qflow.App:
    """The app, on ``url`` under ``prefix`` (the test builds its producer side with it too)."""
    app = qflow.App(url, prefix=prefix)
    due = app.queue(QUEUE)

    @due.processor(concurrency=4)
    async def tick(job: qflow.Job[int]) -> None:
        secs, micros = await commands.command(app.redis(), "TIME")
        started = int(secs) * 1000 + int(micros) / 1000
        directory = os.environ.get("FLEET_LEDGER")
        if directory:
            path = Path(directory) / f"{os.getpid()}.due"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{job.id} {started:.3f}\n".encode())
            finally:
                os.close(fd)

    return app


app = build(
    os.environ.get("FLEET_REDIS_URL", "redis://127.0.0.1:6379/0"), os.environ.get("FLEET_PREFIX", "qflow")
)


def starts(directory: Path) -> dict[str, float]:
    """Job id -> start (server ms), merged from every process's file."""
    out: dict[str, float] = {}
    for path in directory.glob("*.due"):
        for line in path.read_text().splitlines():
            job_id, started = line.split()
            out[job_id] = float(started)
    return out
