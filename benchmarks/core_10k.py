"""Acceptance check: 10,000 jobs, one in-process worker with concurrency 50, every job runs exactly once.

    python benchmarks/core_10k.py [--jobs 10000] [--concurrency 50] [--url redis://...]

Without ``--url`` (or ``QFLOW_REDIS_URL``) it starts its own throwaway valkey-server
(``qflow.testing.local_server``). It works under a unique key prefix and deletes its keys at the end, so it is
safe against a shared server. The handler counts executions per job id; the script verifies that every id
ran exactly once and that the queue counts show every job completed, prints one summary line and exits 1 if
any job was lost or ran twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack

import redis.asyncio as aioredis

import qflow
from qflow.testing import local_server


async def run(url: str, prefix: str, jobs: int, concurrency: int) -> int:
    # Default retention keeps the newest 1000 completed jobs; keep them all so the counts can be checked.
    app = qflow.App(url, prefix=prefix, retention=qflow.RetentionSettings(completed_count=jobs))
    queue = app.queue("core10k")
    runs: Counter[str] = Counter()

    @queue.processor(concurrency=concurrency)
    async def noop(job: qflow.Job[int]) -> None:
        runs[job.id] += 1

    try:
        t0 = time.perf_counter()
        handles = await queue.add_bulk(qflow.JobSpec("noop", i) for i in range(jobs))
        enqueue_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        await app.run_worker(burst=True, concurrency=concurrency)
        drain_s = time.perf_counter() - t0

        ids = {h.id for h in handles}
        counts = await queue.counts()
        stats = await queue.stats()
        once = sum(runs[i] == 1 for i in ids)
        duplicates = sum(runs[i] > 1 for i in ids)
        lost = sum(runs[i] == 0 for i in ids)
        strangers = sum(n for i, n in runs.items() if i not in ids)
        # Every job must also be *recorded* completed, not only have run.
        lost = max(lost, jobs - counts["completed"])
        print(
            f"jobs {jobs} completed-once {once} duplicates {duplicates} lost {lost} | "
            f"enqueue {enqueue_s:.2f}s ({jobs / enqueue_s:,.0f} jobs/s) | "
            f"drain {drain_s:.2f}s ({jobs / drain_s:,.0f} jobs/s) with concurrency {concurrency} | "
            f"counts {counts} stats {stats}"
        )
        ok = (
            lost == 0
            and duplicates == 0
            and strangers == 0
            and len(handles) == len(ids) == jobs
            and counts
            == {"waiting": 0, "active": 0, "delayed": 0, "completed": jobs, "failed": 0, "expired": 0}
            and stats.get("completed") == jobs
        )
        return 0 if ok else 1
    finally:
        await _delete_prefix(app.redis(), prefix)
        await app.close()


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs to add (default 10000)")
    parser.add_argument("--concurrency", type=int, default=50, help="worker concurrency (default 50)")
    parser.add_argument(
        "--url",
        default=os.environ.get("QFLOW_REDIS_URL"),
        help="Redis URL (default: $QFLOW_REDIS_URL, else a throwaway valkey-server)",
    )
    parser.add_argument("--prefix", default=None, help="key prefix (default: a unique one)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.concurrency < 1:
        parser.error("--jobs and --concurrency must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prefix = args.prefix or f"qflowbench-{uuid.uuid4().hex[:12]}"
    with ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        return asyncio.run(run(url, prefix, args.jobs, args.concurrency))


if __name__ == "__main__":
    sys.exit(main())
