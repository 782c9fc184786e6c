"""Repeatable jobs: a cron expression declared in code, an interval upserted at run time, two workers.

    python -m examples.patterns.cron        (needs the cron extra: pip install -e '.[cron]')

``@queue.cron("*/2 * * * * *")`` declares a job every two seconds (six fields: seconds first); each worker
process upserts the declaration when it starts, and the same declaration again changes nothing.
``await queue.schedule(id, ..., every=1)`` creates or changes a schedule from any process, here this one.
There is no beat process: the scheduler runs inside each worker, and two workers (two would be two hosts in
production) still create exactly one job per tick, because creating it and moving the schedule to its next
tick is one atomic compare-and-set in Redis, timed by the server's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import qflow

app = qflow.App()
chores = app.queue("patterns-cron")
runs: Counter[str] = Counter()


@chores.cron("*/2 * * * * *", payload="every two seconds")
@chores.processor
async def heartbeat(job: qflow.Job[str]) -> None:
    runs[job.id] += 1
    print(f"  {job.id}: {job.payload}")


@chores.processor
async def sweep(job: qflow.Job[dict[str, int]]) -> None:
    runs[job.id] += 1
    print(f"  {job.id}: sweep {job.payload}")


async def main(seconds: float = 4.5) -> None:
    async with app:
        workers = [qflow.Worker(app), qflow.Worker(app)]  # as two processes would, each with its scheduler
        tasks = [asyncio.create_task(w.run()) for w in workers]
        for w in workers:
            await w.ready.wait()
        await chores.schedule("sweep-every-second", "sweep", {"older_than_days": 30}, every=1)
        print(f"two workers, running {seconds:g} s:")
        await asyncio.sleep(seconds)  # the demo's running time
        for s in await chores.schedules():
            print(f"{s.id}: {s.describe()}, {s.fired} jobs, next run in {s.next_run - time.time():.1f} s")
        await chores.unschedule("sweep-every-second")
        await chores.unschedule("heartbeat")  # the declaration comes back when a worker starts again
        for w in workers:
            w.stop()
        await asyncio.gather(*tasks)
        print(f"{len(runs)} jobs, each run {set(runs.values())} time(s)")


if __name__ == "__main__":
    asyncio.run(main())
