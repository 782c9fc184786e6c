"""A worker app for process tests that records every run in a side-effect ledger a SIGKILL cannot eat.

Each worker process appends JSON lines to its own file ``<dir>/ledger-<pid>.jsonl``, opened with
``O_APPEND`` and written with one ``os.write`` per line, straight to the kernel (no userspace buffer): what
the process wrote before it was killed is in the page cache, and a SIGKILL loses none of it. One file per
pid means no two writers share a file; ``read_ledger`` merges them.

Events: ``ready`` (the worker is fetching), ``draining`` (a stop was requested), ``start`` / ``end`` /
``cancel`` around each handler run (job id, attempt, stalls, pid), all stamped with ``time.monotonic()``
(CLOCK_MONOTONIC is system-wide on Linux, so stamps of different processes compare).

Run as a worker process (the test starts it with ``python -m tests.process.ledger_app`` from the repo
root), configured by environment variables:

- ``QFLOW_REDIS_URL``, ``QFLOW_TEST_PREFIX``: where the queue lives;
- ``QFLOW_LEDGER_DIR``: the ledger directory;
- ``QFLOW_LEDGER_CONCURRENCY``: jobs this process runs at once (default 8);
- ``QFLOW_LEDGER_DRAIN_TIMEOUT``: the worker's drain timeout (default: ``qflow.testing.FAST``'s);
- ``QFLOW_LEDGER_MAX_SLEEP``: cap on how long a job sleeps in *this* process, so a second worker can
  finish quickly what the first one was given as a long job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import qflow
from qflow.testing import FAST

QUEUE = "ledger"
PROCESSOR = "work"

ENV_URL = "QFLOW_REDIS_URL"
ENV_PREFIX = "QFLOW_TEST_PREFIX"
ENV_DIR = "QFLOW_LEDGER_DIR"
ENV_CONCURRENCY = "QFLOW_LEDGER_CONCURRENCY"
ENV_DRAIN_TIMEOUT = "QFLOW_LEDGER_DRAIN_TIMEOUT"
ENV_MAX_SLEEP = "QFLOW_LEDGER_MAX_SLEEP"


class Work(msgspec.Struct, frozen=True):
    """Payload of a ledger job: how long its handler sleeps."""

    seconds: float


class LedgerWriter:
    """Appends ledger lines to this process's own file; every line is one ``write(2)``."""

    def __init__(self, directory: Path) -> None:
        self.pid = os.getpid()
        self.path = directory / f"ledger-{self.pid}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "pid": self.pid, "t": time.monotonic(), **fields})
        os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def build_app(
    url: str | None,
    prefix: str,
    *,
    ledger: LedgerWriter | None = None,
    max_sleep: float | None = None,
) -> tuple[qflow.App, qflow.Queue]:
    """The App and its ``ledger`` queue. Producers (the tests) call it without a ledger: they only add."""
    app = qflow.App(url, prefix=prefix, worker=FAST)
    queue = app.queue(QUEUE)

    @queue.processor(name=PROCESSOR, concurrency=8)
    async def work(job: qflow.Job[Work]) -> int:
        fields = {"job": job.id, "attempt": job.attempt, "stalls": job.stalls}
        if ledger is not None:
            ledger.write("start", **fields)
        seconds = job.payload.seconds if max_sleep is None else min(job.payload.seconds, max_sleep)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if ledger is not None:
                ledger.write("cancel", **fields)
            raise
        if ledger is not None:
            ledger.write("end", **fields)
        return os.getpid()

    return app, queue


async def _serve(ledger: LedgerWriter) -> None:
    env = os.environ
    drain = env.get(ENV_DRAIN_TIMEOUT)
    max_sleep = env.get(ENV_MAX_SLEEP)
    settings = FAST if drain is None else msgspec.structs.replace(FAST, drain_timeout=float(drain))
    app, _ = build_app(
        env[ENV_URL],
        env[ENV_PREFIX],
        ledger=ledger,
        max_sleep=None if max_sleep is None else float(max_sleep),
    )

    async def markers(worker: qflow.Worker) -> None:
        # A companion runs beside the worker's own tasks until the drain is over: it can say when the
        # worker is really fetching and when it began to stop, which the parent polls for. Worker exposes
        # the stop request only as the ``stopping`` property, hence the poll.
        await worker.ready.wait()
        ledger.write("ready")
        while not worker.stopping:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        ledger.write("draining")

    # What ``app.run_worker(handle_signals=True, settings=...)`` does, plus the marker companion.
    worker = qflow.Worker(
        app,
        concurrency=int(env.get(ENV_CONCURRENCY, "8")),
        settings=settings,
        companions=[markers],
    )
    try:
        await worker.run(handle_signals=True)
    finally:
        await app.close()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    ledger = LedgerWriter(Path(os.environ[ENV_DIR]))
    try:
        asyncio.run(_serve(ledger))
    finally:
        ledger.close()


# -- the checker (parent side) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One ledger line."""

    event: str
    pid: int
    t: float
    job: str | None = None
    attempt: int | None = None
    stalls: int | None = None


@dataclass
class Ledger:
    """Every worker's ledger file merged, in time order."""

    entries: list[Entry] = field(default_factory=list)
    torn: int = 0
    """Trailing lines without a newline (a write cut short); never seen in practice, but counted."""

    def events(self, event: str, *, job: str | None = None, pid: int | None = None) -> list[Entry]:
        return [
            e
            for e in self.entries
            if e.event == event and (job is None or e.job == job) and (pid is None or e.pid == pid)
        ]

    def pids(self, event: str) -> set[int]:
        return {e.pid for e in self.entries if e.event == event}

    def runs(self) -> dict[str, list[Entry]]:
        """``start`` entries by job id."""
        out: dict[str, list[Entry]] = {}
        for e in self.events("start"):
            assert e.job is not None
            out.setdefault(e.job, []).append(e)
        return out


def read_ledger(directory: Path) -> Ledger:
    """Merge the ledger files of every process that wrote to ``directory``."""
    ledger = Ledger()
    for path in sorted(directory.glob("ledger-*.jsonl")):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines[-1]:
            ledger.torn += 1
        for line in lines[:-1]:
            ledger.entries.append(Entry(**json.loads(line)))
    ledger.entries.sort(key=lambda e: e.t)
    return ledger


if __name__ == "__main__":
    main()
