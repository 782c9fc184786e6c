"""The worker app of ``benchmarks/idle_fleet.py``: ``qflow worker _idle_app:app -p N``, default settings.

``IDLE_URL``, ``IDLE_PREFIX``: where the queue lives; ``IDLE_CONCURRENCY``: jobs per process (4);
``IDLE_LEDGER``: a directory where each process appends ``<job id> <start, server ms>`` to ``<pid>.log`` (the
handler reads the server's clock first thing). Only the public API: it runs on older trees too.
"""

from __future__ import annotations

import os
from pathlib import Path

import qflow

app = qflow.App(
    os.environ.get("IDLE_URL", "redis://127.0.0.1:6379/0"), prefix=os.environ.get("IDLE_PREFIX", "idle")
)
queue = app.queue("idle")


@queue.processor(concurrency=int(os.environ.get("IDLE_CONCURRENCY", "4")))
async def tick(job: qflow.Job[int]) -> None:
    secs, micros = await app.redis().execute_command("TIME")  # type: ignore[no-untyped-call]
    started = int(secs) * 1000 + int(micros) / 1000
    path = Path(os.environ["IDLE_LEDGER"]) / f"{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{job.id} {started:.3f}\n".encode())
    finally:
        os.close(fd)
