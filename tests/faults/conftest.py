"""Fixtures of the fault suite: a server of our own per test, a proxy, worker subprocesses, the producer side.

Each test gets a fresh ``valkey-server`` (AOF on, ``noeviction``) that it may kill, pause or fill, never the
session's server or the system Redis. Worker subprocesses are ``tests.process.ledger_app`` (its ledger and the
``Workers`` fixture class are reused, with the fault profile's timings); everything is killed and reaped in
teardown, whatever the test did.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

import qflow
from tests.faults.harness import (
    PROFILE,
    SOCKET_TIMEOUT,
    Check,
    FaultWindow,
    Finished,
    Load,
    Proxy,
    Snapshot,
    ValkeyServer,
    check,
    poll,
    progressed,
    snapshot,
)
from tests.process import ledger_app
from tests.process.conftest import Workers
from tests.process.fleet_app import Fleet
from tests.process.ledger_app import PROCESSOR, Ledger, Work, read_ledger

KEEP = 1_000_000
"""Retention of the fault tests that look at every finished job's record (its result, its error)."""
TRIM_KEEP = 25
"""Retention of the tests under a steady load: small, so trimming runs all along (a ``Finished`` watcher
vouches for the jobs it deletes). At most 160 jobs finish per second in them: a job stays over 150 ms."""


class FaultWorkers(Workers):
    """``ledger_app`` worker subprocesses with the fault profile (socket timeout, retention) by default."""

    def __init__(self, redis_url: str, prefix: str, directory: Path, defaults: Mapping[str, str]) -> None:
        super().__init__(redis_url, prefix, directory)
        self.defaults = dict(defaults)

    def spawn(  # same parameters, keyword-only
        self, *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Any:
        return super().spawn(env={**self.defaults, **(env or {})}, **kwargs)


def profile_env(**overrides: object) -> dict[str, str]:
    """``ledger_app`` environment for the fault profile, with ``overrides`` (e.g. ``QFLOW_LEDGER_LEASE``)."""
    env = {
        ledger_app.ENV_SOCKET_TIMEOUT: str(SOCKET_TIMEOUT),
        ledger_app.ENV_KEEP: str(KEEP),
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture
def server() -> Iterator[ValkeyServer]:
    """A valkey-server of this test's own, AOF on (``everysec``), ``noeviction``; killed afterwards."""
    s = ValkeyServer(appendonly=True)
    try:
        s.start()
        yield s
    finally:
        s.close()


@pytest.fixture
def proxy(server: ValkeyServer) -> Iterator[Proxy]:
    """A fault proxy in front of ``server`` (mode ``pass``)."""
    p = Proxy(server.port)
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def fault_prefix() -> str:
    return f"qflowfault-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fault_workers(server: ValkeyServer, fault_prefix: str, tmp_path: Path) -> Iterator[FaultWorkers]:
    """Worker subprocesses on ``server`` (or, with ``url=``, the proxy); all killed and reaped afterwards."""
    directory = tmp_path / "ledger"
    directory.mkdir()
    w = FaultWorkers(server.url, fault_prefix, directory, profile_env())
    try:
        yield w
    finally:
        w.cleanup()


@pytest.fixture
async def producer(server: ValkeyServer, fault_prefix: str) -> AsyncIterator[qflow.Queue]:
    """The producer side of ``ledger_app``, straight to ``server``."""
    app, queue = ledger_app.build_app(
        server.url, fault_prefix, settings=PROFILE, socket_timeout=SOCKET_TIMEOUT, keep=KEEP
    )
    yield queue
    await app.close()


@pytest.fixture
def faultq(producer: qflow.Queue) -> qflow.Queue:
    """The producer side of ``ledger_app``'s ``ledger-faults`` queue (poison, block, swallow)."""
    return producer.app.queues[ledger_app.FAULT_QUEUE]


@pytest.fixture
def direct(server: ValkeyServer) -> Iterator[redis.Redis]:
    """A synchronous client straight to ``server``, for snapshots and fault commands."""
    c = server.client()
    try:
        yield c
    finally:
        c.close()


async def add_work(queue: qflow.Queue, n: int, seconds: float, name: str = PROCESSOR) -> list[str]:
    """Add ``n`` jobs in one call; return their ids (acknowledged: ``add_bulk`` returned)."""
    jobs = await queue.add_bulk([qflow.JobSpec(name, Work(seconds=seconds)) for _ in range(n)])
    return [j.id for j in jobs]


def _unseen_finishes(snap: Snapshot, finished: Finished | None) -> int:
    """Finishes the stats count that ``finished`` never saw (jobs trimmed between two of its readings)."""
    if finished is None:
        return 0
    done = set(snap.completed) | finished.ever("completed")
    failed = set(snap.failed) | finished.ever("failed")
    return snap.stats.get("completed", 0) - len(done) + snap.stats.get("failed", 0) - len(failed)


async def settle(
    client: redis.Redis,
    queue: qflow.Queue,
    ids: Iterable[str],
    *,
    timeout: float,
    what: str = "every acknowledged job to finish",
    details: Any = str,
    finished: Finished | None = None,
) -> tuple[Snapshot, float]:
    """Poll snapshots until every id in ``ids`` is completed or failed and nothing is active or waiting.

    A job retention trimmed counts as finished if ``finished`` saw it finish. Returns the quiescent snapshot
    and when it was taken (monotonic). Fails with the last check's violations after ``timeout``.
    """
    wanted = list(ids)
    deadline = time.monotonic() + timeout
    seen = {} if finished is None else finished.outcome
    while True:
        snap = await asyncio.to_thread(snapshot, client, queue.keys)
        left = [i for i in wanted if snap.state.get(i, seen.get(i)) not in ("completed", "failed")]
        # Gone from Redis without the watcher seeing it finish: trimmed between two of its readings, if the
        # counters hold as many finishes it did not see (the same settling as `check`).
        unseen = [i for i in left if i not in snap.state and finished is not None and finished.behind]
        done = len(left) == len(unseen) and (not unseen or _unseen_finishes(snap, finished) >= len(unseen))
        if done and not snap.active and not snap.wait:
            return snap, time.monotonic()
        if time.monotonic() > deadline:
            c = check(snap, wanted, finished=finished)
            pytest.fail(
                f"timed out after {timeout}s waiting for {what}: {c.figures()}\n"
                + "\n".join(c.violations[:20])
                + f"\n{details()}"
            )
        await asyncio.sleep(0.05)


T = TypeVar("T")


async def inject_rounds(
    inject: Callable[[], T],
    client: redis.Redis,
    queue: qflow.Queue,
    what: str,
    rounds: int = 3,
    faults: list[FaultWindow] | None = None,
) -> list[T]:
    """Inject a fault ``rounds`` times under load, each time waiting until 10 more jobs completed.

    Returns what each ``inject()`` returned (connections reset or killed, say); appends each round's window
    (the injection) to ``faults``.
    """
    out = []
    for round_ in range(rounds):
        t0 = time.monotonic()
        out.append(inject())
        if faults is not None:
            faults.append(FaultWindow(what, t0, time.monotonic()))
        await poll(
            progressed(client, queue.keys, 10),
            timeout=10,
            what=f"progress after {what} {round_ + 1}",
        )
    return out


def ledger_figures(led: Ledger, ids: Iterable[str]) -> dict[str, int]:
    """``dup``: jobs whose handler started more than once; ``dup_end``: finished more than once."""
    wanted = set(ids)
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    for e in led.entries:
        if e.job in wanted:
            if e.event == "start":
                starts[e.job] = starts.get(e.job, 0) + 1
            elif e.event == "end":
                ends[e.job] = ends.get(e.job, 0) + 1
    return {
        "runs": sum(starts.values()),
        "dup": sum(n > 1 for n in starts.values()),
        "dup_end": sum(n > 1 for n in ends.values()),
        "never_ran": len(wanted - set(starts)),
    }


def assert_clean(c: Check) -> None:
    """Nothing lost, every healthy job completed, no invariant broken (see ``check``: a job failed as stalled
    must have been in flight at enough faults; finished sets within their retention bound)."""
    assert c.lost == 0, c.violations[:20]
    assert c.healthy_failed == 0, f"{c.healthy_failed} healthy jobs ended failed: {c.violations[:20]}"
    assert c.violations == [], c.violations[:20]


class Running:
    """A steady ``Load`` on the ``work`` processor, running as a task until ``stop()``."""

    def __init__(self, queue: qflow.Queue, *, rate: float, seconds: float, tag: str = "j") -> None:
        self.load = Load(queue, lambda: Work(seconds=seconds), rate=rate, name=PROCESSOR, tag=tag)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> Running:
        self._task = asyncio.create_task(self.load.run(self._stop))
        return self

    async def stop(self) -> list[str]:
        """Stop adding; return every acknowledged id."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)
        return self.load.acknowledged

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()


def failures_logged(led: Ledger, pid: int, since: float) -> list[float]:
    """When ``pid`` logged a warning or error after ``since`` (it noticed something was wrong)."""
    return [e.t for e in led.events("log", pid=pid) if e.t >= since]


TARGET = "tests.faults.fault_app:app"


class FaultFleet(Fleet):
    """``fleet_app.Fleet`` (supervisor subprocesses, control socket, kill-and-reap) running ``fault_app``."""

    def __init__(self, redis_url: str, prefix: str, tmp: Path, **env: str) -> None:
        super().__init__(redis_url, prefix, tmp)
        self.fault_ledger = tmp / "fault-ledger"
        self.fault_ledger.mkdir()
        self.env.update(
            {
                ledger_app.ENV_URL: redis_url,
                ledger_app.ENV_PREFIX: prefix,
                ledger_app.ENV_DIR: str(self.fault_ledger),
                **profile_env(),
                **env,
            }
        )

    def read(self) -> ledger_app.Ledger:
        return read_ledger(self.fault_ledger)


@pytest.fixture
def fault_fleet(server: ValkeyServer, fault_prefix: str, tmp_path: Path) -> Iterator[FaultFleet]:
    """Supervisors (``qflow worker tests.faults.fault_app:app``) on ``server``; all reaped after."""
    f = FaultFleet(server.url, fault_prefix, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()
