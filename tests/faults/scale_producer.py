"""One producer process of the scale test: half of its jobs by single ``add``, half by ``add_bulk``.

``python -m tests.faults.scale_producer TAG N`` (with ``ledger_app``'s ``QFLOW_REDIS_URL`` and
``QFLOW_TEST_PREFIX``) adds N ``work`` jobs with ids ``TAG-s<i>`` (single adds, 64 in flight at once) and
``TAG-b<i>`` (bulk, 500 per call), both halves at the same time, and prints one JSON line with its timings.
Any failed add makes it exit non-zero: every id it was asked for is acknowledged when it exits 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import qflow
from tests.process import ledger_app

IN_FLIGHT = 64
BULK = 500


async def main(tag: str, n: int) -> None:
    app, queue = ledger_app.build_app(os.environ[ledger_app.ENV_URL], os.environ[ledger_app.ENV_PREFIX])
    work = ledger_app.Work(seconds=0.0)
    singles, bulk = n // 2, n - n // 2
    t0 = time.monotonic()

    async def single_adds() -> None:
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            async with sem:
                await queue.add(ledger_app.PROCESSOR, work, job_id=f"{tag}-s{i}")

        for start in range(0, singles, 1000):
            await asyncio.gather(*(one(i) for i in range(start, min(start + 1000, singles))))

    async def bulk_adds() -> None:
        for start in range(0, bulk, BULK):
            await queue.add_bulk(
                qflow.JobSpec(ledger_app.PROCESSOR, work, job_id=f"{tag}-b{i}")
                for i in range(start, min(start + BULK, bulk))
            )

    try:
        await asyncio.gather(single_adds(), bulk_adds())
    finally:
        await app.close()
    print(json.dumps({"tag": tag, "jobs": n, "seconds": time.monotonic() - t0}))


def ids(tag: str, n: int) -> list[str]:
    """The ids ``main(tag, n)`` adds."""
    return [f"{tag}-s{i}" for i in range(n // 2)] + [f"{tag}-b{i}" for i in range(n - n // 2)]


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
