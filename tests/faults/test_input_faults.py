"""Input faults not covered elsewhere (issue #5): a 50 MB job written straight into Redis (slow), and the
same job ids added by two processes at once.

Garbage, truncated, non-UTF-8, 100k-deep and pickle envelopes injected into Redis, wrong-type payloads,
unknown job names, oversized payloads and results through ``add`` are in tests/integration/test_bad_input.py
(one worker in the test process); the same ``job_id`` from two connection pools of one process in
tests/integration/test_worker_behaviour.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter

import msgspec
import pytest
import redis

import qflow
from tests.faults.conftest import FaultWorkers, add_work, assert_clean, settle
from tests.faults.harness import Figures, ValkeyServer, check, seconds
from tests.faults.scale_producer import ids as producer_ids
from tests.integration.test_bad_input import inject
from tests.process import ledger_app
from tests.process.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


def big_envelope(kind: str) -> bytes:
    """A 50 MB job envelope: undecodable garbage, or a valid ``work`` job padded to 50 MB."""
    if kind == "garbage":
        return b"\xc1" + os.urandom(50 * MB)
    big = {"seconds": 0.0, "pad": b"\x00" * (50 * MB)}
    return msgspec.msgpack.encode([ledger_app.PROCESSOR, msgspec.Raw(msgspec.msgpack.encode(big))])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["garbage", "valid"])
async def test_50mb_job_injected_into_redis_neither_crashes_the_worker_nor_loses_a_job(
    kind: str, fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """A 50 MB envelope written straight into Redis (past add's 1 MiB limit), between good jobs: the claim
    fails it at once as a payload error (it never travels to the worker, which stays up), and every good job
    completes."""
    before = await add_work(producer, 5, seconds=0.0)
    await inject(producer, "big", big_envelope(kind))
    after = await add_work(producer, 5, seconds=0.0)
    a = await fault_workers.start(concurrency=4)
    ids = [*before, "big", *after]
    snap, _ = await settle(direct, producer, ids, timeout=40, details=fault_workers.logs)
    c = check(snap, ids, unhealthy=["big"])
    neighbours = Counter(f"{snap.state[i]}:{snap.failure_kind(i)}" for i in before + after)
    Figures(
        f"input_50mb_{kind}",
        jobs=len(ids),
        lost=c.lost,
        healthy_failed=c.healthy_failed,
        big=f"{snap.state.get('big')}:{snap.failure_kind('big')}",
        neighbours=dict(neighbours),
        worker_alive=a.popen.poll() is None,
    ).emit()

    assert_clean(c)
    assert a.popen.poll() is None
    assert snap.state["big"] == "failed"
    assert snap.failure_kind("big") == "payload", "claim.lua fails an oversize stored job as a payload error"
    assert not fault_workers.ledger().events("start", job="big"), "it never reached a handler"


@pytest.mark.slow
async def test_50mb_job_does_not_take_the_jobs_claimed_with_it_down(
    fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """The good jobs claimed in the same batch as a 50 MB one complete, once each; the big one fails as a
    payload error, and the worker goes on. Short leases (0.3 s) make the batch's lease budget explicit."""
    before = await add_work(producer, 5, seconds=0.0)
    await inject(producer, "big", big_envelope("valid"))
    after = await add_work(producer, 5, seconds=0.0)
    a = await fault_workers.start(concurrency=16, env={ledger_app.ENV_LEASE: "0.3"})
    ids = [*before, "big", *after]
    snap, _ = await settle(direct, producer, ids, timeout=40, details=fault_workers.logs)
    led = fault_workers.ledger()
    c = check(snap, ids, unhealthy=["big"])
    assert_clean(c)
    assert a.popen.poll() is None
    assert [snap.state[i] for i in before + after] == ["completed"] * 10
    assert (snap.state["big"], snap.failure_kind("big")) == ("failed", "payload")
    assert all(len(led.events("start", job=i)) == 1 for i in before + after)


async def test_same_job_ids_from_two_processes_at_once_make_one_job_each(
    server: ValkeyServer, fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """Two producer processes add the same 1,000 job ids at the same time (half by add, half by add_bulk):
    1,000 jobs exist, each runs once."""
    n = 1000
    env = {**os.environ, ledger_app.ENV_URL: server.url, ledger_app.ENV_PREFIX: producer.app.prefix}
    await fault_workers.start(concurrency=32)
    procs = await asyncio.gather(*(asyncio.to_thread(_produce, "same", n, env) for _ in range(2)))
    for out in procs:
        assert out.returncode == 0, out.stderr[-2000:]
    ids = producer_ids("same", n)
    snap, _ = await settle(direct, producer, ids, timeout=30, details=fault_workers.logs)
    led = fault_workers.ledger()
    runs: dict[str, int] = {}
    for e in led.events("start"):
        assert e.job is not None
        runs[e.job] = runs.get(e.job, 0) + 1
    c = check(snap, ids)
    Figures(
        "input_same_ids_two_processes",
        jobs=n,
        lost=c.lost,
        healthy_failed=c.healthy_failed,
        dup=sum(r > 1 for r in runs.values()),
        dup_bound=0,
        jobs_in_redis=len(snap.jobs),
        seconds=seconds(max(_took(out.stdout) for out in procs)),
    ).emit()

    assert_clean(c)
    assert len(snap.jobs) == n
    assert sorted(runs) == sorted(ids)
    assert max(runs.values()) == 1
    assert snap.stats.get("completed") == n


def _produce(tag: str, n: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.faults.scale_producer", tag, str(n)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _took(stdout: str) -> float:
    return float(json.loads(stdout.strip().splitlines()[-1])["seconds"])
