"""An idle fleet, ``qflow worker -p 4`` with default settings (issue 14 item 1, issue 19 item 2): delayed jobs
start on time, and one due job wakes one fetcher, not the fleet.

The fleet runs against a server of the test's own, so ``INFO commandstats`` counts only its commands. The
idle fleet's own traffic (each fetcher looks once per block_timeout, heartbeats, the stalled-job checks) is
measured first, for as long as the run, and taken off. Figures are printed as one JSON line (``-s``).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from qflow.testing import local_server
from tests.process import due_app
from tests.process.fleet_app import Fleet

JOBS = 200
SPREAD = (0.5, 3.5)  # seconds after the adds
SENT = ("evalsha", "eval", "bzpopmin", "blmove", "client|id", "client|unblock", "multi", "exec")
"""The commands a worker process sends itself (everything else it sends runs inside its scripts)."""


@pytest.fixture
def own_server() -> Iterator[str]:
    """A valkey-server for this test alone."""
    with local_server() as url:
        yield url


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


async def test_an_idle_fleet_of_four_starts_delayed_jobs_on_time_and_wakes_one_fetcher_per_job(
    own_server: str, tmp_path: Path
) -> None:
    """200 delayed jobs spread over 3 s, added to 4 idle worker processes: p99 <= 20 ms late on the server
    clock, and each due job costs a few commands, not a wake-up of every process."""
    prefix = "idle-fleet"
    fleet = Fleet(own_server, prefix, tmp_path)
    producer = due_app.build(own_server, prefix)
    client = producer.redis()
    q = producer.queues[due_app.QUEUE]
    try:
        sup = fleet.start("-p", "4", target="tests.process.due_app:app")
        await sup.wait_ready(4)
        await asyncio.sleep(2.5)  # every fetcher parked, its first look done

        # The idle fleet's own traffic over as long as the run takes.
        run_for = SPREAD[1] + 0.5
        before = await commandstats(client)
        await asyncio.sleep(run_for)
        idle = delta(await commandstats(client), before)
        idle.pop("info", None)

        before = await commandstats(client)
        started_at = time.monotonic()
        # One at a time, due times in random order: many adds are the new earliest.
        jobs = [await q.add("tick", i, delay=random.uniform(*SPREAD)) for i in range(JOBS)]
        due = {m.decode(): s for m, s in await client.zrange(q.keys.delayed, 0, -1, withscores=True)}
        assert len(due) == JOBS
        await fleet.until(
            lambda: len(due_app.starts(fleet.ledger_dir)) == JOBS, timeout=15, what="every job started"
        )
        await asyncio.sleep(max(0.0, run_for - (time.monotonic() - started_at)))
        run = delta(await commandstats(client), before)
        run.pop("info", None)
        run["zrange"] = run.get("zrange", 0) - 1  # the test's own read of the due times
    finally:
        fleet.cleanup()
        await producer.close()

    starts = due_app.starts(fleet.ledger_dir)
    lateness = sorted(starts[j.id] - due[j.id] for j in jobs)
    p99 = lateness[round(0.99 * (JOBS - 1))]
    # Per due job, the commands the fleet sent (commandstats also counts the calls scripts make: those are
    # left out). The adds (EVALSHA) are the test's own; so is each handler's TIME, which is left out too.
    fleet_cmds = {k: run.get(k, 0) - idle.get(k, 0) for k in SENT}
    fleet_cmds["evalsha"] -= JOBS
    per_job = {k: round(n / JOBS, 2) for k, n in fleet_cmds.items() if n > 0}
    print(
        json.dumps(
            {
                "test": "qflow worker -p 4, idle, default settings: 200 delayed jobs",
                "lateness_ms": {
                    "p50": round(statistics.median(lateness), 2),
                    "p99": round(p99, 2),
                    "max": round(lateness[-1], 2),
                    "min": round(lateness[0], 2),
                },
                "commands_per_due_job": per_job,
                "sent_per_due_job": round(sum(n for n in fleet_cmds.values() if n > 0) / JOBS, 2),
                "idle_fleet_sent_per_s": round(sum(idle.get(k, 0) for k in SENT) / run_for, 1),
            }
        )
    )
    assert lateness[0] >= 0, "a job started before it was due"
    assert p99 <= 20.0, lateness[-10:]
    # No herd: one due job wakes about one fetcher (its wait ends, it claims), not all four processes.
    assert per_job.get("bzpopmin", 0) <= 3.0, per_job
