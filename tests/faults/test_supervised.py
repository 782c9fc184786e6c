"""Faults under the supervisor, ``qflow worker tests.faults.fault_app:app -p N`` (issues #3 and #5).

A poison job that kills its worker process on every delivery must end failed as ``stalled`` after
``max_stalls`` recoveries, with the supervisor replacing each dead worker a bounded number of times and
carrying on with the other jobs. SIGKILL of a child mid-job, SIGTERM drains, double SIGTERM, SIGKILL of the
supervisor and memory recycling are in tests/process/test_supervisor.py.
"""

from __future__ import annotations

import re
import time

import pytest
import redis

import qflow
from tests.faults.conftest import TARGET, FaultFleet, add_work, assert_clean, settle
from tests.faults.harness import PROFILE, Figures, check, seconds
from tests.process.ledger_app import POISON, Work

pytestmark = pytest.mark.timeout(90)


async def test_poison_job_fails_as_stalled_after_max_stalls_and_restarts_stay_bounded(
    fault_fleet: FaultFleet, producer: qflow.Queue, faultq: qflow.Queue, direct: redis.Redis
) -> None:
    """A job that SIGKILLs its worker on every delivery runs max_stalls + 1 times, then fails as 'stalled';
    the supervisor replaces each dead worker (no crash-loop exit) and the other jobs all complete once."""
    sup = fault_fleet.start("-p", "1", "-c", "2", target=TARGET)
    await sup.wait_ready(1)
    t0 = time.monotonic()
    poison = await faultq.add(POISON, Work(seconds=0))
    good = await add_work(producer, 20, seconds=0.05)
    snap_f, _ = await settle(direct, faultq, [poison.id], timeout=45, details=sup.log)
    failed_s = time.monotonic() - t0
    snap, _ = await settle(direct, producer, good, timeout=20, details=sup.log)
    # The fleet carries on: a job added now is done by the worker that replaced the last victim.
    after = await add_work(producer, 1, seconds=0.0)
    snap, _ = await settle(direct, producer, good + after, timeout=15, details=sup.log)
    led = fault_fleet.read()
    deaths = len(re.findall(r"killed by SIGKILL", sup.log()))
    runs = led.events("start", job=poison.id)
    c = check(snap, good + after)
    cf = check(snap_f, [poison.id])
    Figures(
        "poison_job_supervised",
        jobs=len(good) + 2,
        lost=c.lost + cf.lost,
        poison_runs=len(runs),
        worker_deaths=deaths,
        restart_bound=PROFILE.max_stalls + 1,
        poison_failed_s=seconds(failed_s),
        state=snap_f.state.get(poison.id),
        failure=snap_f.failure_kind(poison.id),
        dup=sum(len(led.events("start", job=i)) > 1 for i in good + after),
        dup_bound=deaths * 2,
    ).emit()

    assert_clean(c)
    assert_clean(cf)
    assert snap_f.state[poison.id] == "failed"
    assert snap_f.failure_kind(poison.id) == "stalled"
    assert len(runs) == PROFILE.max_stalls + 1, "one run per delivery: max_stalls recoveries, then failed"
    assert deaths == PROFILE.max_stalls + 1, "one replacement per death, no more"
    assert sup.popen.poll() is None, "the supervisor did not give up (no crash-loop exit)"
    assert "crash loop" not in sup.log()
    assert len(sup.ready_pids()) == 1
