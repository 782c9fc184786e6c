"""Job expiry across a worker SIGKILL and its recovery, counted by ``qflow info`` (issue 14 acceptance)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import qflow
from qflow._broker import commands
from tests.process.conftest import REPO_ROOT, Workers, report
from tests.process.ledger_app import PROCESSOR, Work


def _info(redis_url: str, prefix: str) -> dict[str, dict[str, object]]:
    """``qflow info --json`` for the prefix, by queue."""
    out = subprocess.run(
        [sys.executable, "-m", "qflow", "info", "--url", redis_url, "--prefix", prefix, "--json"],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return {q["queue"]: q for q in json.loads(out.stdout)}


async def test_jobs_expired_while_a_killed_worker_was_recovered_never_run(
    workers: Workers, ledger_queue: qflow.Queue, redis_url: str, prefix: str
) -> None:
    """Worker A is SIGKILLed mid-job; jobs whose deadline passes before B starts are expired, never run
    (ledger), counted in stats and ``qflow info``; A's recovered jobs and the unexpired ones run on B."""
    a = await workers.start(concurrency=2)
    long_jobs = await ledger_queue.add_bulk([qflow.JobSpec(PROCESSOR, Work(seconds=30)) for _ in range(2)])
    await workers.until(lambda led: len(led.events("start", pid=a.pid)) == 2, what="2 jobs running on A")
    a.send(signal.SIGKILL)
    assert await a.wait_exit(timeout=5) == -signal.SIGKILL

    client = ledger_queue.app.redis()
    added_at = await commands.server_ms(client)
    doomed = [await ledger_queue.add(PROCESSOR, Work(seconds=0), expires=0.3) for _ in range(3)]
    kept = [await ledger_queue.add(PROCESSOR, Work(seconds=0), expires=60) for _ in range(3)]
    deadline = time.monotonic() + 10
    while await commands.server_ms(client) < added_at + 400:  # past the short deadline, server clock
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    b = await workers.start(concurrency=2, max_sleep=0.05)
    runs_on_b = {j.id for j in (*long_jobs, *kept)}
    await workers.until(
        lambda led: runs_on_b <= {e.job for e in led.events("end", pid=b.pid)},
        what="B to run the recovered and the unexpired jobs",
    )
    led = workers.ledger()
    ran = set(led.runs())
    for job in doomed:
        assert job.id not in ran, "an expired job ran"
        assert await job.status() == qflow.State.EXPIRED
    stats = await ledger_queue.stats()
    info = _info(redis_url, prefix)[ledger_queue.name]
    report(
        "expiry_recovery", expired=stats.get("expired"), stalled=stats.get("stalled"), info=info["expired"]
    )
    assert stats["expired"] == 3
    assert info["expired"] == 3
    assert info["totals"]["expired"] == 3  # type: ignore[index]
    assert stats["stalled"] >= 2
