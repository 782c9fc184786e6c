"""Faults under the supervisor, ``qflow worker tests.faults.fault_app:app -p N`` (issues #3 and #5).

A poison job that kills its worker process on every delivery must end failed as ``stalled`` after
``max_stalls`` recoveries, with the supervisor replacing each dead worker a bounded number of times and
carrying on with the other jobs, which all complete (issue 12 item 3: recovered beside the poison, healthy
jobs were claimed with it again and again, and failed as stalled with it). SIGKILL of a child mid-job,
SIGTERM drains, double SIGTERM, SIGKILL of the supervisor and memory recycling are in
tests/process/test_supervisor.py.
"""

from __future__ import annotations

import re
import time

import pytest
import redis

import qflow
from tests.faults.conftest import TARGET, FaultFleet, add_work, assert_clean, settle
from tests.faults.harness import PROFILE, Figures, check, deaths, in_flight, seconds
from tests.process.ledger_app import POISON, SWALLOW, Work

pytestmark = pytest.mark.timeout(90)

CONCURRENCY = 4


async def test_poison_job_fails_as_stalled_after_max_stalls_and_restarts_stay_bounded(
    fault_fleet: FaultFleet, producer: qflow.Queue, faultq: qflow.Queue, direct: redis.Redis
) -> None:
    """A job that SIGKILLs its worker on every delivery runs max_stalls + 1 times, then fails as 'stalled';
    the supervisor replaces each dead worker (no crash-loop exit). Every other job completes, the three added
    with the poison to its own queue (claimed in its batches) included; a job runs twice only if it was in
    flight on a worker when the poison killed it, at most the worker's capacity per death."""
    sup = fault_fleet.start("-p", "1", "-c", str(CONCURRENCY), target=TARGET)
    await sup.wait_ready(1)
    t0 = time.monotonic()
    # One add: the poison and three healthy jobs (0.5 s each) land in its queue together, claimed with it.
    poison, *beside = await faultq.add_bulk(
        [qflow.JobSpec(POISON, Work(seconds=0)), *[qflow.JobSpec(SWALLOW, Work(seconds=0.5))] * 3]
    )
    side = [j.id for j in beside]
    good = await add_work(producer, 20, seconds=0.05)
    snap_f, _ = await settle(direct, faultq, [poison.id, *side], timeout=45, details=sup.log)
    failed_s = time.monotonic() - t0
    snap, _ = await settle(direct, producer, good, timeout=20, details=sup.log)
    # The fleet carries on: a job added now is done by the worker that replaced the last victim.
    after = await add_work(producer, 1, seconds=0.0)
    snap, _ = await settle(direct, producer, good + after, timeout=15, details=sup.log)
    led = fault_fleet.read()
    died = len(re.findall(r"killed by SIGKILL", sup.log()))
    runs = led.events("start", job=poison.id)
    # The poison's deaths are the faults: each in flight on the dying worker could be hit.
    hit = in_flight(led, deaths(led, [poison.id]), dict.fromkeys([poison.id, *side, *good, *after], t0))
    c = check(snap, good + after, in_flight=hit)
    cf = check(snap_f, [poison.id, *side], unhealthy=[poison.id], in_flight=hit)
    healthy = [*side, *good, *after]
    ran_again = [i for i in healthy if len(led.events("start", job=i)) > 1]
    unexplained = [i for i in ran_again if not hit[i]]
    # Per death, what the dying worker held beside the poison: CONCURRENCY jobs of each healthy processor.
    dup_bound = died * 2 * CONCURRENCY
    Figures(
        "poison_job_supervised",
        jobs=len(healthy) + 1,
        lost=c.lost + cf.lost,
        healthy_failed=c.healthy_failed + cf.healthy_failed,
        beside_poison={i: f"{snap_f.state.get(i)}:{snap_f.failure_kind(i)}" for i in side},
        poison_runs=len(runs),
        worker_deaths=died,
        restart_bound=PROFILE.max_stalls + 1,
        poison_failed_s=seconds(failed_s),
        state=snap_f.state.get(poison.id),
        failure=snap_f.failure_kind(poison.id),
        dup=len(ran_again),
        dup_bound=dup_bound,
        dup_unexplained=len(unexplained),
    ).emit()

    assert_clean(c)
    assert_clean(cf)  # the jobs beside the poison completed: none failed as stalled with it
    assert c.completed + cf.completed == len(healthy)
    assert len(ran_again) <= dup_bound
    assert unexplained == [], "jobs ran twice without being in flight at a death"
    assert snap_f.state[poison.id] == "failed"
    assert snap_f.failure_kind(poison.id) == "stalled"
    assert len(runs) == PROFILE.max_stalls + 1, "one run per delivery: max_stalls recoveries, then failed"
    assert died == PROFILE.max_stalls + 1, "one replacement per death, no more"
    assert sup.popen.poll() is None, "the supervisor did not give up (no crash-loop exit)"
    assert "crash loop" not in sup.log()
    assert len(sup.ready_pids()) == 1
