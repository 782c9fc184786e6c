"""A producer process for the dedup race tests: adds ``n`` jobs with one dedup key, as fast as it can.

Run as ``python -m tests.process.dedup_producer <url> <prefix> <mode> <n> <tag> <go-file>``: it waits
(polling) for ``go-file`` to exist, so two of them start adding at the same moment, then adds ``n`` jobs with
payload ``"<tag>-<i>"`` and ``Dedup("race", ttl=60, mode=<mode>)`` (debounce: with ``delay=60``), and prints
one JSON line per add: its outcome and the id of the job it names.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import qflow

QUEUE = "race"
KEY = "race"


def wait_for(go: str) -> None:
    """Poll (1 ms, 30 s deadline) until ``go`` exists."""
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no go file")
        time.sleep(0.001)


async def main(url: str, prefix: str, mode: str, n: int, tag: str) -> None:
    app = qflow.App(url, prefix=prefix)
    q = app.queue(QUEUE)
    dedup = qflow.Dedup(KEY, ttl=60, mode="debounce" if mode == "debounce" else "throttle")
    delay = 60.0 if mode == "debounce" else None
    await app.redis().ping()  # connected before the race starts
    lines = []
    for i in range(n):
        job = await q.add("work", f"{tag}-{i}", delay=delay, dedup=dedup)
        lines.append(json.dumps({"outcome": str(job.outcome), "id": job.id}))
    await app.close()
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    url, prefix, mode, n, tag, go = sys.argv[1:]
    wait_for(go)
    asyncio.run(main(url, prefix, mode, int(n), tag))
