"""Retention under load (issue 12 item 7): the finished sets stay within their count while two workers drain
thousands of jobs as fast as they can, and what is trimmed had finished first.

The fault tests under a steady load keep 25 finished jobs (``conftest.TRIM_KEEP``) and the soak 50, so
trimming runs under faults too; this test is the fast path: 0 s jobs at ``-c 200``, where one ack batch holds
up to 200 completions. A ``Finished`` watcher (the harness's ledger of finished jobs) vouches for every job
retention deleted, so a trimmed job counts as what it ended as, never as lost, and the largest size each
set reached is on record.
"""

from __future__ import annotations

import time

import pytest
import redis

import qflow
from tests.faults.conftest import FaultWorkers, assert_clean, settle
from tests.faults.harness import Figures, Finished, ValkeyServer, check, seconds
from tests.process import ledger_app
from tests.process.ledger_app import PROCESSOR, Work

pytestmark = pytest.mark.timeout(90)

JOBS = 12_000
KEEP = 2000
"""Large enough that a finished job stays in its set for 200 ms or more at full speed (10,000 jobs/s here;
the watcher reads every 20 ms), small enough that most of the jobs are trimmed."""
CONCURRENCY = 200
FAILING = 4
"""One job in FAILING times out (a 1 s sleep with a 10 ms timeout): the failed set is trimmed too."""


async def test_retention_keeps_its_count_under_load_and_trims_only_finished_jobs(
    server: ValkeyServer, fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """12,000 jobs, a quarter failing on a timeout, drained by two workers at -c 200 that keep 2,000
    finished jobs of each kind: neither set ever holds more than 2,000 (ack batches of up to 200 completions
    trimmed at most 100 a call), and every job trimmed had finished first: each healthy one completed once,
    each failing one failed as timed out, none lost."""
    env = {ledger_app.ENV_KEEP: str(KEEP)}
    pids = [fault_workers.spawn(concurrency=CONCURRENCY, env=env).pid for _ in range(2)]
    await fault_workers.until(lambda led: set(pids) <= led.pids("ready"), what="two workers ready")
    specs = [
        qflow.JobSpec(PROCESSOR, Work(seconds=1.0), timeout=0.01)
        if n % FAILING == 0
        else qflow.JobSpec(PROCESSOR, Work(seconds=0.0))
        for n in range(JOBS)
    ]
    with Finished(server, producer.keys, keep=KEEP) as fin:
        jobs = await producer.add_bulk(specs)
        ids = [j.id for j in jobs]
        failing = ids[::FAILING]
        t0 = time.monotonic()
        snap, done_at = await settle(
            direct, producer, ids, timeout=60, details=fault_workers.logs, finished=fin
        )
    c = check(snap, ids, unhealthy=failing, finished=fin, keep=KEEP)
    kinds = {fin.kinds.get(i, snap.failure_kind(i)) for i in failing}
    Figures(
        "retention_under_load",
        jobs=len(ids),
        lost=c.lost,
        healthy_failed=c.healthy_failed,
        completed=c.completed,
        failed=c.failed,
        trimmed=c.trimmed,
        keep=KEEP,
        completed_max=c.completed_max,
        failed_max=c.failed_max,
        completed_twice=c.completed_twice,
        watcher_readings=fin.readings,
        watcher_behind=fin.behind,
        failure_kinds=kinds,
        drain_s=seconds(done_at - t0),
    ).emit()

    assert fin.behind == 0, "the watcher saw every finished job (none came and went between two readings)"
    assert_clean(c)  # nothing lost, no healthy job failed, neither set over its count, none completed twice
    assert c.completed == len(ids) - len(failing)
    assert c.failed == len(failing)
    assert kinds == {"timeout"}
    assert c.trimmed >= len(ids) - 2 * KEEP, "retention trimmed all but the last 2,000 of each kind"
