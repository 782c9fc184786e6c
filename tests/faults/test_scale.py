"""Scale (issue #5, slow): 100,000 jobs enqueued at once from 4 processes (half single ``add``, half
``add_bulk``), drained by ``qflow worker -p 2``: every job completed exactly once. Prints jobs/s and Redis
bytes per job. ``QFLOW_SCALE_JOBS`` changes the count (e.g. for a quick local look).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
import redis

from tests.faults.conftest import TARGET, FaultFleet, assert_clean
from tests.faults.harness import Figures, ValkeyServer, check, snapshot
from tests.faults.scale_producer import ids as producer_ids
from tests.process import ledger_app
from tests.process.conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

JOBS = int(os.environ.get("QFLOW_SCALE_JOBS", "100000"))
PRODUCERS = 4


def start_producer(tag: str, n: int, env: dict[str, str]) -> subprocess.Popen[str]:
    """One ``scale_producer`` process adding ``n`` jobs tagged ``tag``."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faults.scale_producer", tag, str(n)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_100k_jobs_from_4_producers_drained_by_2_processes_complete_once(
    server: ValkeyServer, fault_fleet: FaultFleet, fault_prefix: str, direct: redis.Redis
) -> None:
    """100k jobs, 4 producer processes at once (half add, half add_bulk), 2 worker processes: all completed,
    none twice (ledger and Redis agree), throughput and memory per job reported."""
    keys = ledger_app.build_app(server.url, fault_prefix)[1].keys
    baseline = int(direct.info("memory")["used_memory"])
    sup = fault_fleet.start("-p", "2", "-c", "64", "-q", ledger_app.QUEUE, target=TARGET)
    await sup.wait_ready(2, timeout=30)
    env = {**os.environ, ledger_app.ENV_URL: server.url, ledger_app.ENV_PREFIX: fault_prefix}
    per = JOBS // PRODUCERS
    tags = [f"p{i}" for i in range(PRODUCERS)]
    t0 = time.monotonic()
    producers = [start_producer(tag, per, env) for tag in tags]
    peak = baseline
    try:
        deadline = time.monotonic() + 240
        while True:
            info = direct.info("memory")
            peak = max(peak, int(info["used_memory"]))
            done = int(direct.zcard(keys.completed))
            if done >= per * PRODUCERS and all(p.poll() is not None for p in producers):
                break
            assert time.monotonic() < deadline, f"only {done} of {per * PRODUCERS} completed after 240 s"
            assert sup.popen.poll() is None, sup.log()[-3000:]
            await asyncio.sleep(0.5)
        drained_at = time.monotonic()
        outs = [p.communicate(timeout=30) for p in producers]
    finally:
        for p in producers:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
    for p, (_, err) in zip(producers, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    enqueue_s = max(json.loads(out.strip().splitlines()[-1])["seconds"] for out, _ in outs)
    final = int(direct.info("memory")["used_memory"])
    all_ids = [i for tag in tags for i in producer_ids(tag, per)]
    snap = await asyncio.to_thread(snapshot, direct, keys)
    c = check(snap, all_ids)
    led = fault_fleet.read()
    starts: dict[str, int] = {}
    for e in led.events("start"):
        assert e.job is not None
        starts[e.job] = starts.get(e.job, 0) + 1
    elapsed = drained_at - t0
    Figures(
        "scale_100k",
        jobs=len(all_ids),
        lost=c.lost,
        healthy_failed=c.healthy_failed,
        dup=sum(n > 1 for n in starts.values()),
        dup_bound=0,
        completed=c.completed,
        enqueue_s=round(enqueue_s, 1),
        enqueue_jobs_per_s=round(len(all_ids) / enqueue_s),
        drain_s=round(elapsed, 1),
        jobs_per_s=round(len(all_ids) / elapsed),
        redis_bytes_per_job_peak=round((peak - baseline) / len(all_ids)),
        redis_bytes_per_completed_job_kept=round((final - baseline) / len(all_ids)),
        stalled=snap.stats.get("stalled", 0),
    ).emit()

    assert_clean(c)
    assert c.completed == len(all_ids)
    assert len(starts) == len(all_ids), "every job ran"
    assert max(starts.values()) == 1, "no job ran twice"
    assert snap.stats.get("completed") == len(all_ids)
