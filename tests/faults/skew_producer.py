"""A producer process for the clock-skew test: adds delayed ``ledger_app`` jobs and reports its clocks.

Run as ``python -m tests.faults.skew_producer N DELAY`` with ``ledger_app``'s ``QFLOW_REDIS_URL`` and
``QFLOW_TEST_PREFIX``, under a skewed clock. Prints one JSON line: its wall clock (``time.time()`` and
``datetime.now``), and per job the monotonic time its ``add`` returned (monotonic is not skewed, so the test
can compare it with the ledger's start times).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime

from tests.process import ledger_app


async def main(n: int, delay: float) -> None:
    app, queue = ledger_app.build_app(os.environ[ledger_app.ENV_URL], os.environ[ledger_app.ENV_PREFIX])
    added: dict[str, float] = {}
    try:
        for i in range(n):
            job = await queue.add(ledger_app.PROCESSOR, ledger_app.Work(seconds=0.0), delay=delay)
            added[job.id] = time.monotonic()
            await asyncio.sleep(0.05 * (i % 3))  # spread the due times a little
    finally:
        await app.close()
    print(json.dumps({"time": time.time(), "datetime": datetime.now(UTC).timestamp(), "added": added}))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
