"""The soak's other kinds of job, beside ``ledger_app``'s ``work``: on the same ``ledger`` queue, declared by
the workers (``fault_app``) and by the producer alike (a queue's producer may only add names it declares).

- ``flaky``: raises on its first ``fails`` attempts, then returns (healthy: it must end completed, having
  spent ``fails`` attempts);
- ``doomed``: raises on every attempt (it must end failed with kind "error", after all its attempts);
- ``sync_work``: a plain ``def`` handler, run in a thread, that sleeps ``seconds`` (healthy);
- ``die``: SIGKILLs its own worker process on every delivery, as ``ledger_app``'s ``poison`` does (it must
  end failed as "stalled" after ``max_stalls`` recoveries, and take no healthy job down with it).

Each writes ``ledger_app``'s ``start`` (and ``end``) lines, with the attempt, so a retry is told apart from a
duplicate run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import msgspec

import qflow
from tests.process.ledger_app import LedgerWriter, Work

FLAKY = "flaky"
DOOMED = "doomed"
SYNC = "sync_work"
DIE = "die"


class Flaky(msgspec.Struct, frozen=True):
    """Payload of a ``flaky`` job: how many attempts raise before one returns."""

    fails: int


def declare(queue: qflow.Queue, ledger: LedgerWriter | None) -> None:
    """Declare the soak's processors on ``queue`` (``ledger_app``'s ``ledger``), writing to ``ledger``."""

    def write(event: str, job: qflow.Job[object]) -> None:
        if ledger is not None:
            ledger.write(event, job=job.id, attempt=job.attempt, stalls=job.stalls)

    @queue.processor(name=FLAKY, concurrency=8)
    async def flaky(job: qflow.Job[Flaky]) -> int:
        write("start", job)
        if job.attempt <= job.payload.fails:
            raise RuntimeError(f"flaky: attempt {job.attempt} of a job that fails {job.payload.fails} times")
        await asyncio.sleep(0.05)
        write("end", job)
        return os.getpid()

    @queue.processor(name=DOOMED, concurrency=8)
    async def doomed(job: qflow.Job[Work]) -> int:
        write("start", job)
        raise RuntimeError("doomed: this job always raises")

    @queue.processor(name=SYNC, concurrency=8)
    def sync_work(job: qflow.Job[Work]) -> int:
        write("start", job)
        time.sleep(job.payload.seconds)
        write("end", job)
        return os.getpid()

    @queue.processor(name=DIE, concurrency=8)
    async def die(job: qflow.Job[Work]) -> int:
        write("start", job)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")
