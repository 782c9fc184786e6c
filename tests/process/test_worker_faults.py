"""Worker faults with real processes and real signals: SIGKILL mid-job, graceful and forced SIGTERM.

Guarantees under test (docs: DESIGN.md): at-least-once execution after a crash, recovered within lease TTL +
check interval (2); graceful stop that finishes in-flight work, then releases what is left at once without
spending an attempt (5). Every test prints its figures as one JSON line: ``lost`` (jobs not completed),
``dup`` (jobs whose handler started more than once), and the seconds that matter to it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

import qflow
from qflow.testing import FAST
from tests.process.conftest import Workers, report
from tests.process.ledger_app import PROCESSOR, Ledger, Work

pytestmark = pytest.mark.timeout(60)


async def add_jobs(queue: qflow.Queue, n: int, seconds: float) -> list[qflow.Job[Work]]:
    return await queue.add_bulk([qflow.JobSpec(PROCESSOR, Work(seconds=seconds)) for _ in range(n)])


def ids_of(jobs: list[qflow.Job[Work]]) -> set[str]:
    return {j.id for j in jobs}


def ended_on(pid: int, ids: set[str]) -> Callable[[Ledger], bool]:
    """A ledger predicate: every job in ``ids`` has an ``end`` line written by ``pid``."""
    return lambda led: ids <= {e.job for e in led.events("end", pid=pid)}


def started_on(pid: int, n: int) -> Callable[[Ledger], bool]:
    """A ledger predicate: ``pid`` has started at least ``n`` runs."""
    return lambda led: len(led.events("start", pid=pid)) >= n


async def figures(queue: qflow.Queue, jobs: list[qflow.Job[Work]], ledger: Ledger) -> tuple[int, int]:
    """``(lost, dup)``: jobs not completed, and jobs whose handler started more than once."""
    lost = sum([await j.status() != qflow.State.COMPLETED for j in jobs])
    runs = ledger.runs()
    dup = sum(len(runs.get(j.id, [])) > 1 for j in jobs)
    return lost, dup


async def attempts_spent(queue: qflow.Queue, ids: set[str]) -> dict[str, bytes | str | None]:
    """The raw ``attempts`` hash entries of ``ids`` (None: no attempt recorded)."""
    client = queue.app.redis()
    return {i: await client.hget(queue.keys.attempts, i) for i in sorted(ids)}


async def test_sigkill_mid_job_redelivers_after_lease_expiry(
    workers: Workers, ledger_queue: qflow.Queue
) -> None:
    """Jobs in flight on a SIGKILLed worker are recovered by lease expiry and completed by another worker."""
    n = 4
    a = await workers.start(concurrency=n)
    jobs = await add_jobs(ledger_queue, n, seconds=30)
    ids = ids_of(jobs)
    await workers.until(started_on(a.pid, n), what=f"{n} jobs in flight on worker A")
    # A second worker, already fetching and idle: A holds every job and nothing waits.
    b = await workers.start(concurrency=n, max_sleep=0.05)
    assert (await ledger_queue.counts())["active"] == n

    killed_at = a.send(signal.SIGKILL)
    assert await a.wait_exit(timeout=5) == -signal.SIGKILL
    await workers.until(ended_on(b.pid, ids), what="worker B to finish every killed job")
    results = {j.id: await j.result(timeout=10) for j in jobs}

    led = workers.ledger()
    lost, dup = await figures(ledger_queue, jobs, led)
    recovery = [e.t - killed_at for e in led.events("start", pid=b.pid)]
    stats = await ledger_queue.stats()
    report(
        "sigkill",
        jobs=n,
        lost=lost,
        dup=dup,
        recovery_s_min=round(min(recovery), 3),
        recovery_s_max=round(max(recovery), 3),
        stalled=stats.get("stalled", 0),
    )
    assert lost == 0
    assert results == dict.fromkeys(ids, b.pid), "the killed jobs were completed by the other worker"
    counts = await ledger_queue.counts()
    assert counts == {"waiting": 0, "active": 0, "delayed": 0, "completed": n, "failed": 0, "expired": 0}
    for job_id, runs in led.runs().items():
        assert [r.pid for r in runs] == [a.pid, b.pid], f"job {job_id} ran at most twice: A, then B"
        assert (runs[1].attempt, runs[1].stalls) == (1, 1), "a stall is counted, not an attempt"
    assert not led.events("end", pid=a.pid)
    assert stats.get("stalled", 0) >= n
    # Recovery came from lease expiry + the stalled check: not before the lease A last renewed (every
    # lease_ttl / 3) could expire, and within lease_ttl + check_interval (plus scheduling slack).
    assert min(recovery) >= FAST.lease_ttl * 2 / 3 - 0.1
    assert max(recovery) <= FAST.lease_ttl + FAST.check_interval + 1.0
    assert led.torn == 0


async def test_sigterm_drains_in_flight_jobs_and_exits_zero(
    workers: Workers, ledger_queue: qflow.Queue
) -> None:
    """On SIGTERM a worker stops fetching, completes its in-flight jobs itself, releases nothing, exits 0."""
    n = 3
    a = await workers.start(concurrency=n)
    jobs = await add_jobs(ledger_queue, n, seconds=1.0)
    ids = ids_of(jobs)
    await workers.until(started_on(a.pid, n), what=f"{n} jobs in flight on worker A")

    sent_at = a.send(signal.SIGTERM)
    await workers.until(lambda led: a.pid in led.pids("draining"), what="worker A to start draining")
    # Added while A drains: a stopping worker must leave them alone.
    late = await add_jobs(ledger_queue, 2, seconds=0.01)
    assert await a.wait_exit(timeout=FAST.drain_timeout + 5) == 0
    assert a.exited_at is not None
    drain_seconds = a.exited_at - sent_at

    led = workers.ledger()
    lost, dup = await figures(ledger_queue, jobs, led)
    stats = await ledger_queue.stats()
    report("sigterm_drain", jobs=n, lost=lost, dup=dup, drain_s=round(drain_seconds, 3))
    assert lost == 0
    assert dup == 0
    assert {j.id: await j.result(timeout=1) for j in jobs} == dict.fromkeys(ids, a.pid)
    assert ids <= {e.job for e in led.events("end", pid=a.pid)}
    assert not led.events("cancel")
    assert stats.get("released", 0) == 0
    assert drain_seconds < FAST.drain_timeout
    assert [await j.status() for j in late] == [qflow.State.WAITING] * 2
    assert not ids_of(late) & set(led.runs())
    assert (await ledger_queue.counts())["waiting"] == 2


async def test_sigterm_past_drain_timeout_releases_jobs_without_spending_an_attempt(
    workers: Workers, ledger_queue: qflow.Queue
) -> None:
    """Jobs still running at the drain timeout go back to waiting at once, with no attempt spent."""
    n, drain_timeout = 3, 0.5
    a = await workers.start(concurrency=n, drain_timeout=drain_timeout)
    jobs = await add_jobs(ledger_queue, n, seconds=10)
    ids = ids_of(jobs)
    await workers.until(started_on(a.pid, n), what=f"{n} jobs in flight on worker A")

    sent_at = a.send(signal.SIGTERM)
    assert await a.wait_exit(timeout=5) == 0
    assert a.exited_at is not None
    stop_seconds = a.exited_at - sent_at
    # No worker is alive now, so no stalled check can run: whatever is waiting was released by A itself.
    counts_after_exit = await ledger_queue.counts()
    statuses = [await j.status() for j in jobs]
    stats = await ledger_queue.stats()
    spent = await attempts_spent(ledger_queue, ids)

    b = await workers.start(concurrency=n, max_sleep=0.05)
    await workers.until(ended_on(b.pid, ids), what="worker B to run the released jobs")
    results = {j.id: await j.result(timeout=10) for j in jobs}
    led = workers.ledger()
    lost, dup = await figures(ledger_queue, jobs, led)
    report("sigterm_drain_timeout", jobs=n, lost=lost, dup=dup, stop_s=round(stop_seconds, 3))

    assert counts_after_exit["waiting"] == n
    assert counts_after_exit["active"] == 0
    assert statuses == [qflow.State.WAITING] * n
    assert stats.get("released", 0) == n
    assert stats.get("stalled", 0) == 0
    assert spent == dict.fromkeys(sorted(ids))
    assert drain_timeout <= stop_seconds < drain_timeout + 1.5
    assert {e.job for e in led.events("cancel", pid=a.pid)} == ids
    assert not led.events("end", pid=a.pid)
    assert lost == 0
    assert results == dict.fromkeys(ids, b.pid)
    for runs in led.runs().values():
        assert [(r.pid, r.attempt, r.stalls) for r in runs] == [(a.pid, 1, 0), (b.pid, 1, 0)]


async def test_second_sigterm_stops_now_and_releases_unfinished_jobs(
    workers: Workers, ledger_queue: qflow.Queue
) -> None:
    """A second SIGTERM mid-drain stops the worker well before its drain timeout and releases its jobs."""
    n, drain_timeout = 3, 10.0
    a = await workers.start(concurrency=n, drain_timeout=drain_timeout)
    jobs = await add_jobs(ledger_queue, n, seconds=30)
    ids = ids_of(jobs)
    await workers.until(started_on(a.pid, n), what=f"{n} jobs in flight on worker A")

    a.send(signal.SIGTERM)
    await workers.until(lambda led: a.pid in led.pids("draining"), what="worker A to start draining")
    second_at = a.send(signal.SIGTERM)
    assert await a.wait_exit(timeout=5) == 0
    assert a.exited_at is not None
    stop_seconds = a.exited_at - second_at
    counts_after_exit = await ledger_queue.counts()
    stats = await ledger_queue.stats()
    spent = await attempts_spent(ledger_queue, ids)

    b = await workers.start(concurrency=n, max_sleep=0.05)
    await workers.until(ended_on(b.pid, ids), what="worker B to run the released jobs")
    results = {j.id: await j.result(timeout=10) for j in jobs}
    led = workers.ledger()
    lost, dup = await figures(ledger_queue, jobs, led)
    report("double_sigterm", jobs=n, lost=lost, dup=dup, stop_s=round(stop_seconds, 3))

    assert stop_seconds < 1.5, f"second SIGTERM took {stop_seconds:.2f}s (drain timeout {drain_timeout}s)"
    assert counts_after_exit["waiting"] == n
    assert counts_after_exit["active"] == 0
    assert stats.get("released", 0) == n
    assert stats.get("stalled", 0) == 0
    assert spent == dict.fromkeys(sorted(ids))
    assert {e.job for e in led.events("cancel", pid=a.pid)} == ids
    assert lost == 0
    assert results == dict.fromkeys(ids, b.pid)
    for runs in led.runs().values():
        assert [(r.pid, r.attempt) for r in runs] == [(a.pid, 1), (b.pid, 1)]
