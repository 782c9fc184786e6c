"""Delayed jobs: run something later, after a delay or at a given time.

    python -m examples.patterns.delayed

``add(..., delay=seconds)`` or ``add(..., run_at=aware_datetime)`` stores the job as ``delayed``; it becomes
``waiting`` when its time comes, by the Redis server's clock (so machines whose clocks disagree still agree
on when it is due), and a worker runs it then. Adding is durable at once: the job survives restarts of every
process while it waits.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import qflow

app = qflow.App()
reminders = app.queue("patterns-delayed")


@reminders.processor
async def remind(job: qflow.Job[str]) -> float:
    return time.time()  # when it actually ran


async def main() -> None:
    async with app:
        added_at = time.time()
        soon = await remind.add("abandoned cart, first nudge", delay=0.5)
        later = await remind.add(
            "abandoned cart, second nudge", run_at=datetime.now(UTC) + timedelta(seconds=1)
        )
        now = await remind.add("order confirmation")
        print("right after adding:", {job.payload: str(await job.status()) for job in (now, soon, later)})
        await app.run_worker(burst=True)  # a burst worker also waits for delayed jobs that are due soon
        for job in (now, soon, later):
            ran_at = await job.result(timeout=1)
            print(f"  {job.payload!r}: ran {ran_at - added_at:.2f} s after it was added")


if __name__ == "__main__":
    asyncio.run(main())
