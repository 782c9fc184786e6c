"""An idle fleet: what one job costs in commands, and how late delayed jobs start (issue 14 item 1, issue 19
item 2).

    python benchmarks/idle_fleet.py                               # this checkout; 1, 8 and 32 processes
    python benchmarks/idle_fleet.py --tree /tmp/qflow-base -p 8   # another tree's qflow package

For each fleet size N, ``qflow worker _idle_app:app -p N`` (default ``WorkerSettings``: block_timeout 2 s;
concurrency ``-c``, 4 by default) runs on a throwaway valkey-server, with the qflow package of ``--tree``
(the producer, which adds the jobs, runs this checkout's). Once every process is blocked on the server:

- ``herd``: 10 jobs added one at a time, each waited for (polling the handlers' ledger files, not Redis);
  per add, the commands the workers sent: blocking waits (``BLMOVE`` before issue 14, ``BZPOPMIN`` after),
  script calls (``EVALSHA``: claims and acks), ``CLIENT`` (``ID`` / ``UNBLOCK``);
- ``due``: 200 jobs delayed 0.5-3.5 s, added one at a time in random order; lateness = start (``TIME`` in the
  handler) minus the due time the server stored; p50 / p99 / max, and the commands per due job.

Commands are ``INFO commandstats`` deltas of the commands a worker sends itself (the calls its scripts make
are left out), minus the producer's adds, minus what the idle fleet sends by itself over as long (each
fetcher's look every block_timeout, heartbeats, stalled-job checks), measured just before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qflow, for the producer
import qflow
from qflow.testing import local_server

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SENT = ("evalsha", "eval", "bzpopmin", "blmove", "client|id", "client|unblock", "multi", "exec")


async def sent(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {k: int(stats.get(f"cmdstat_{k}", {}).get("calls", 0)) for k in SENT}


def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a[k] - b.get(k, 0) for k in a}


def starts(ledger: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in ledger.glob("*.log"):
        for line in path.read_text().splitlines():
            job_id, at = line.split()
            out[job_id] = float(at)
    return out


async def until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def blocked(client: aioredis.Redis) -> int:
    return sum(
        1
        for c in await client.client_list()
        if "b" in c.get("flags", "") and c.get("cmd") in ("blmove", "bzpopmin")
    )


def fleet(url: str, tree: Path, n: int, jobs: int, concurrency: int) -> dict[str, object]:
    """Start ``qflow worker _idle_app:app -p n`` with ``tree``'s qflow, measure it, kill it."""
    prefix = f"idle{n}-{random.getrandbits(24):06x}"
    ledger = Path(tempfile.mkdtemp(prefix="qf-idle-"))
    run_dir = Path(tempfile.mkdtemp(prefix="qf-run-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLOW_")}
    env.update(
        IDLE_URL=url,
        IDLE_PREFIX=prefix,
        IDLE_LEDGER=str(ledger),
        IDLE_CONCURRENCY=str(concurrency),
        PYTHONPATH=f"{tree}{os.pathsep}{HERE}",
        QFLOW_RUN_DIR=str(run_dir),
        QFLOW_EMBEDDED="0",
    )
    with (ledger / "supervisor.txt").open("wb") as log:
        sup = subprocess.Popen(
            [sys.executable, "-m", "qflow", "worker", "_idle_app:app", "-p", str(n)],
            cwd=run_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return asyncio.run(measure(url, prefix, ledger, sup, n, jobs))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sup.pid, 9)
            sup.wait()


async def measure(
    url: str, prefix: str, ledger: Path, sup: subprocess.Popen[bytes], n: int, jobs: int
) -> dict[str, object]:
    # The producer runs this checkout's qflow, whatever the fleet's tree: its adds are taken off the counts.
    producer = qflow.App(url, prefix=prefix)
    q = producer.queue("idle")

    @q.processor
    async def tick(job: qflow.Job[int]) -> None:
        raise AssertionError("the producer runs no job")

    client = aioredis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 60
        while await blocked(client) < n:
            if sup.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the fleet did not come up: see {ledger / 'supervisor.txt'}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # past every fetcher's first look

        # herd: one add at a time
        t0, before = time.monotonic(), await sent(client)
        for i in range(10):
            job = await q.add("tick", i)
            await until(lambda job=job: job.id in starts(ledger), 10, "a job to start")
        await asyncio.sleep(0.05)
        herd, herd_s = minus(await sent(client), before), time.monotonic() - t0
        herd["evalsha"] -= 10
        # the idle fleet's own traffic, over a window as long as the due-time run
        window = 4.5
        before = await sent(client)
        await asyncio.sleep(window)
        idle = minus(await sent(client), before)

        # due: delayed jobs in random order
        t0, before = time.monotonic(), await sent(client)
        added = [await q.add("tick", i, delay=random.uniform(0.5, 3.5)) for i in range(jobs)]
        due = {m.decode(): s for m, s in await client.zrange(q.keys.delayed, 0, -1, withscores=True)}
        await until(lambda: all(j.id in starts(ledger) for j in added), 30, "the delayed jobs")
        await asyncio.sleep(max(0.0, window - (time.monotonic() - t0)))
        run = minus(minus(await sent(client), before), idle)
        run["evalsha"] -= jobs
        at = starts(ledger)
        late = sorted(at[j.id] - due[j.id] for j in added if j.id in due)
    finally:
        await producer.close()
        await client.aclose()
    return {
        "processes": n,
        "herd_per_add": {k: round(v / 10, 1) for k, v in herd.items() if v},
        "herd_seconds": round(herd_s, 2),
        "due_lateness_ms": {
            "p50": round(statistics.median(late), 2),
            "p99": round(late[round(0.99 * (len(late) - 1))], 2),
            "max": round(late[-1], 2),
            "jobs": len(late),
        },
        "due_per_job": {k: round(v / jobs, 2) for k, v in run.items() if v > 0},
        "idle_sent_per_s": round(sum(idle.values()) / window, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="folder holding the qflow package to run")
    parser.add_argument("-p", "--processes", default="1,8,32", help="fleet sizes (comma-separated)")
    parser.add_argument("--jobs", type=int, default=200, help="delayed jobs per fleet")
    parser.add_argument("-c", "--concurrency", type=int, default=4, help="jobs per process (default 4)")
    parser.add_argument("--url", help="target this server (its commandstats must be the fleet's alone)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        for n in (int(x) for x in args.processes.split(",")):
            figures = fleet(url, args.tree.resolve(), n, args.jobs, args.concurrency)
            print(json.dumps({"tree": str(args.tree), "c": args.concurrency, **figures}), flush=True)


if __name__ == "__main__":
    main()
