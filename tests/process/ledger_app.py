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

Added for the fault suite (tests/faults, issue #5), all optional:

- ``QFLOW_LEDGER_CRASH``: a crash point, where this process SIGKILLs itself the first time it gets there
  (``install_crash_point``), after writing a ``crash`` line: ``after_claim`` (a claim reply with jobs arrived,
  no handler ran; the line lists the claimed ids), ``before_ack`` (handlers finished; the completion script
  was not sent), ``after_ack`` (the completion script's reply arrived; nothing else happened);
- ``QFLOW_LEDGER_LEASE``, ``QFLOW_LEDGER_SOCKET_TIMEOUT``: the lease TTL and the client socket timeout;
- ``QFLOW_LEDGER_KEEP``: keep that many finished jobs, without an age limit (the checker needs them all);
- qflow's WARNING and ERROR log records are also written to the ledger as ``log`` lines, so a test can time
  what the worker noticed (a failed renewal, a rejected ack) on the same clock as everything else.

A second queue, ``ledger-faults`` (its own slots, so the ``ledger`` queue's capacity is unchanged), has the
misbehaving processors: ``poison`` (SIGKILLs its own process, every time), ``block`` (blocks the event loop
for ``seconds`` on its first delivery), ``swallow`` (sleeps ``seconds`` and swallows every cancellation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
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
FAULT_QUEUE = "ledger-faults"

ENV_URL = "QFLOW_REDIS_URL"
ENV_PREFIX = "QFLOW_TEST_PREFIX"
ENV_DIR = "QFLOW_LEDGER_DIR"
ENV_CONCURRENCY = "QFLOW_LEDGER_CONCURRENCY"
ENV_DRAIN_TIMEOUT = "QFLOW_LEDGER_DRAIN_TIMEOUT"
ENV_MAX_SLEEP = "QFLOW_LEDGER_MAX_SLEEP"
ENV_CRASH = "QFLOW_LEDGER_CRASH"
ENV_LEASE = "QFLOW_LEDGER_LEASE"
ENV_SOCKET_TIMEOUT = "QFLOW_LEDGER_SOCKET_TIMEOUT"
ENV_KEEP = "QFLOW_LEDGER_KEEP"

POISON = "poison"
BLOCK = "block"
SWALLOW = "swallow"
CRASH_POINTS = ("after_claim", "before_ack", "after_ack")


class Work(msgspec.Struct, frozen=True):
    """Payload of a ledger job: how long its handler sleeps."""

    seconds: float
    later: float | None = None
    """``swallow`` only: how long it sleeps on a redelivery (``stalls > 0``), if not ``seconds``."""


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
    settings: qflow.WorkerSettings = FAST,
    socket_timeout: float = 5.0,
    keep: int | None = None,
) -> tuple[qflow.App, qflow.Queue]:
    """The App and its ``ledger`` queue. Producers (the tests) call it without a ledger: they only add.

    ``keep``: retain that many completed and failed jobs, with no age limit (default: qflow's retention).
    """
    retention = (
        None
        if keep is None
        else qflow.RetentionSettings(
            completed_count=keep, completed_age=None, failed_count=keep, failed_age=None
        )
    )
    app = qflow.App(url, prefix=prefix, worker=settings, socket_timeout=socket_timeout, retention=retention)
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

    faults = app.queue(FAULT_QUEUE, retention=retention)

    @faults.processor(name=POISON, concurrency=8)
    async def poison(job: qflow.Job[Work]) -> int:
        """Kill this worker process, every time the job is delivered (a segfaulting C extension, an OOM)."""
        if ledger is not None:
            ledger.write("start", job=job.id, attempt=job.attempt, stalls=job.stalls)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    @faults.processor(name=BLOCK, concurrency=8)
    async def block(job: qflow.Job[Work]) -> int:
        """Block the event loop for ``seconds`` on the first delivery (then return at once)."""
        fields = {"job": job.id, "attempt": job.attempt, "stalls": job.stalls}
        if ledger is not None:
            ledger.write("start", **fields)
        if job.stalls == 0:
            time.sleep(job.payload.seconds)  # noqa: ASYNC251  # deliberately blocking: that is the fault
        if ledger is not None:
            ledger.write("end", **fields)
        return os.getpid()

    @faults.processor(name=SWALLOW, concurrency=8)
    async def swallow(job: qflow.Job[Work]) -> int:
        """Sleep ``seconds`` and swallow every cancellation meanwhile (a bare ``except BaseException``)."""
        fields = {"job": job.id, "attempt": job.attempt, "stalls": job.stalls}
        if ledger is not None:
            ledger.write("start", **fields)
        seconds = job.payload.seconds
        if job.stalls and job.payload.later is not None:
            seconds = job.payload.later
        if max_sleep is not None:
            seconds = min(seconds, max_sleep)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.sleep(left)
            except asyncio.CancelledError:
                if ledger is not None:
                    ledger.write("swallowed", **fields)
        if ledger is not None:
            ledger.write("end", **fields)
        return os.getpid()

    return app, queue


class LedgerLogHandler(logging.Handler):
    """Writes qflow's warnings and errors to the ledger as ``log`` lines (message only)."""

    def __init__(self, ledger: LedgerWriter) -> None:
        super().__init__(level=logging.WARNING)
        self.ledger = ledger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.ledger.write("log", msg=f"{record.name}: {record.getMessage()}"[:500])
        except Exception:  # a log line must never break the worker
            self.handleError(record)


def install_crash_point(point: str, ledger: LedgerWriter) -> None:
    """Make this process SIGKILL itself at ``point`` (one of ``CRASH_POINTS``), the first time it is reached.

    No change to the engine: ``after_claim`` wraps ``Lanes.start`` (called for each job of a claim reply,
    in one synchronous loop) and kills from a callback queued before the first handler task can run, so
    every job of the batch is claimed and none has started; ``before_ack`` and ``after_ack`` wrap the
    broker's ``complete`` (``qflow._broker.scripts.complete``), which the worker calls for every ack batch.
    """
    from qflow._broker import scripts
    from qflow._worker import lanes as _lanes

    if point not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {point!r}: one of {CRASH_POINTS}")

    def die(ids: list[str] | None) -> None:
        ledger.write("crash", point=point, ids=ids)
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "after_claim":
        claimed: list[str] = []
        real_start = _lanes.Lanes.start

        def start(self: Any, r: Any, d: Any) -> None:
            if not claimed:
                asyncio.get_running_loop().call_soon(die, claimed)
            claimed.append(d.id)
            real_start(self, r, d)

        _lanes.Lanes.start = start  # type: ignore[method-assign]  # a test-only hook
        return

    real_complete = scripts.complete

    async def crashing_complete(*args: Any, **kwargs: Any) -> Any:
        """``complete``, with a SIGKILL just before it is sent or just after its reply."""
        if point == "before_ack":
            die(None)
        res = await real_complete(*args, **kwargs)
        die(None)
        return res

    scripts.complete = crashing_complete  # type: ignore[assignment]  # a test-only hook


def app_from_env(ledger: LedgerWriter | None) -> qflow.App:
    """The worker-side App configured by this module's environment variables (see the module docstring)."""
    env = os.environ
    settings = FAST
    drain = env.get(ENV_DRAIN_TIMEOUT)
    if drain is not None:
        settings = msgspec.structs.replace(settings, drain_timeout=float(drain))
    lease = env.get(ENV_LEASE)
    if lease is not None:
        settings = msgspec.structs.replace(settings, lease_ttl=float(lease))
    max_sleep = env.get(ENV_MAX_SLEEP)
    keep = env.get(ENV_KEEP)
    app, _ = build_app(
        env[ENV_URL],
        env[ENV_PREFIX],
        ledger=ledger,
        max_sleep=None if max_sleep is None else float(max_sleep),
        settings=settings,
        socket_timeout=float(env.get(ENV_SOCKET_TIMEOUT, "5.0")),
        keep=None if keep is None else int(keep),
    )
    if ledger is not None:
        logging.getLogger("qflow").addHandler(LedgerLogHandler(ledger))
        point = env.get(ENV_CRASH)
        if point:
            install_crash_point(point, ledger)
    return app


async def _serve(ledger: LedgerWriter) -> None:
    env = os.environ
    app = app_from_env(ledger)
    settings = app.worker_settings

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
    msg: str | None = None
    """``log`` lines: the log message."""
    point: str | None = None
    """``crash`` lines: the crash point."""
    ids: list[str] | None = None
    """``crash`` lines: the jobs concerned (claimed, or being acked)."""


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
