"""Client clocks skewed by ±300 s (issue #5): delayed jobs still run on time, leases still hold.

qflow takes every timestamp from the Redis server (``TIME`` inside the scripts) and measures durations on the
monotonic clock, so a producer or a worker whose wall clock is 5 minutes off changes nothing. The producer and
both workers run under a skewed clock: with libfaketime (Debian's ``faketime`` package) when it is installed,
else with ``tests/faults/skew/sitecustomize.py``, which skews Python's ``time.time`` and ``datetime``.
Either way the monotonic clock stays true, so the ledger's times and the producer's can be compared.

Not covered here: ``run_at=`` is an absolute time the *caller* computes, so it carries the caller's skew;
that is what the caller asked for (documented on ``Queue.add``).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis

import qflow
from tests.faults.conftest import FaultWorkers, assert_clean, settle
from tests.faults.harness import Figures, ValkeyServer, check
from tests.process import ledger_app
from tests.process.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

SKEW = 300.0
DELAY = 1.5
LIBFAKETIME = (
    []
    if os.environ.get("QFLOW_FAULTS_NO_FAKETIME")  # force the sitecustomize fallback
    else sorted(
        glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
    )
)


def skewed_env(seconds: float) -> dict[str, str]:
    """Environment variables that put a child process ``seconds`` ahead (or behind) on its wall clock."""
    if LIBFAKETIME:
        return {
            "LD_PRELOAD": LIBFAKETIME[0],
            "FAKETIME": f"{seconds:+.0f}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1",
        }
    site = str(Path(__file__).parent / "skew")
    return {
        "QFLOW_FAULTS_SKEW": str(seconds),
        "PYTHONPATH": os.pathsep.join([site, str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.mark.parametrize("producer_skew", [SKEW, -SKEW], ids=["producer_ahead", "producer_behind"])
async def test_delayed_jobs_run_on_time_whatever_the_client_clocks(
    producer_skew: float,
    server: ValkeyServer,
    fault_workers: FaultWorkers,
    producer: qflow.Queue,
    direct: redis.Redis,
) -> None:
    """A producer 5 minutes ahead (or behind) adds jobs delayed 1.5 s; workers 5 minutes behind and ahead run
    them 1.5 s after the add (server clock), not 5 minutes early or late; no lease lapses."""
    a = await fault_workers.start(concurrency=4, env=skewed_env(-producer_skew))
    a_up = time.time()
    b = await fault_workers.start(concurrency=4, env=skewed_env(producer_skew))
    b_up = time.time()
    env = {
        **os.environ,
        ledger_app.ENV_URL: server.url,
        ledger_app.ENV_PREFIX: producer.app.prefix,
        **skewed_env(producer_skew),
    }
    n = 12
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.faults.skew_producer", str(n), str(DELAY)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    added: dict[str, float] = report["added"]
    snap, _ = await settle(direct, producer, list(added), timeout=15, details=fault_workers.logs)
    led = fault_workers.ledger()
    lateness = {}
    for job_id, t_add in added.items():
        (start,) = led.events("start", job=job_id)
        lateness[job_id] = start.t - (t_add + DELAY)
    c = check(snap, list(added))
    producer_offset = report["time"] - time.time()
    # Each worker's wall clock, read off its first log line (logging stamps records with time.time()),
    # against this process's when the worker was ready: a second or so after that line.
    worker_offsets = {"a": log_clock(a.log()) - a_up, "b": log_clock(b.log()) - b_up}
    secs, micros = direct.time()
    our_offset = time.time() - (secs + micros / 1e6)
    Figures(
        f"clock_skew_{'ahead' if producer_skew > 0 else 'behind'}",
        jobs=n,
        lost=c.lost,
        healthy_failed=c.healthy_failed,
        dup=sum(len(led.events("start", job=i)) > 1 for i in added),
        dup_bound=0,
        skew_s=producer_skew,
        skew_via="libfaketime" if LIBFAKETIME else "sitecustomize",
        producer_clock_offset_s=round(producer_offset, 1),
        worker_clock_offsets_s={k: round(v, 1) for k, v in worker_offsets.items()},
        lateness_min_s=round(min(lateness.values()), 3),
        lateness_max_s=round(max(lateness.values()), 3),
        ran_on={"a": len(led.events("start", pid=a.pid)), "b": len(led.events("start", pid=b.pid))},
        stalled=snap.stats.get("stalled", 0),
    ).emit()

    # The clocks under test: the test's own agrees with the server's (the one qflow uses), so the offsets
    # below are against the server; the producer's and both workers' really were off by the skew.
    assert abs(our_offset) < 1.0, "the test process's clock is the server's"
    assert abs(producer_offset - producer_skew) < 10, "the producer's wall clock really was skewed"
    assert abs(report["datetime"] - report["time"]) < 5, "datetime.now skewed alike"
    assert abs(worker_offsets["a"] + producer_skew) < 10, "worker A's wall clock really was skewed"
    assert abs(worker_offsets["b"] - producer_skew) < 10, "worker B's wall clock really was skewed"
    assert_clean(c)
    assert min(lateness.values()) > -0.05, "no job ran before its delay (server clock)"
    assert max(lateness.values()) < 1.0, "every job ran within a second of its due time"
    assert snap.stats.get("stalled", 0) == 0


def log_clock(log: str) -> float:
    """The wall-clock time (Unix seconds) of a worker's first log record, as its process saw it."""
    stamp = re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", log, re.MULTILINE)
    assert stamp is not None, f"no log record in {log[:500]!r}"
    return datetime.strptime(stamp.group(), "%Y-%m-%d %H:%M:%S,%f").timestamp()
