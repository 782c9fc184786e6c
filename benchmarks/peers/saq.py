"""SAQ adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py). Run by SAQ's own venv.

Settings: ``Worker(concurrency=c)``, defaults otherwise (jobs: timeout 10 s, results kept 600 s). SAQ has no
bulk enqueue API (``Queue.map`` enqueues concurrently and then waits for the results).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).parent))
import _protocol as P  # run with -P: this folder is appended to sys.path, never put first

CHUNK = 2_000


def info(args: Any) -> None:
    from importlib.metadata import version

    P.emit(
        {
            "name": "SAQ",
            "version": version("saq"),
            "parser": P.redis_parser(),
            "guarantee": "ack after run; active jobs swept and retried after their timeout (10 s): "
            "at-least-once",
            "settings": "concurrency=c; job defaults (timeout 10 s, ttl 600 s)",
            "bulk": False,
            "concurrent": True,
            "keys": ["saq:*saqbench-{ns}*", "saqbench-{ns}*"],
        }
    )


def make_queue(args: Any) -> Any:
    from saq import Queue

    return Queue.from_url(args.url, name=f"saqbench-{args.ns}")


async def enqueue(args: Any) -> None:
    queue = make_queue(args)
    await queue.connect()
    n, sleep = args.n, args.sleep
    try:
        if args.mode in ("one", "paced"):

            async def go() -> None:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                for i in range(n):
                    if args.mode == "paced":
                        delay = t0 + i / args.rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await queue.enqueue("bench", ts=time.time_ns(), sleep=sleep)

        else:

            async def go() -> None:
                for start in range(0, n, CHUNK):
                    await asyncio.gather(
                        *(
                            queue.enqueue("bench", ts=time.time_ns(), sleep=sleep)
                            for _ in range(min(CHUNK, n - start))
                        )
                    )

        await P.timed_async(go, n)
    finally:
        await queue.disconnect()


def worker(args: Any) -> None:
    from saq import Worker

    tally = P.Tally(args.latency)

    async def bench(ctx: Any, *, ts: int, sleep: float) -> None:
        tally.begin(ts)
        if sleep:
            await asyncio.sleep(sleep)
        tally.end()

    bench.__qualname__ = "bench"
    session = P.WorkerSession(tally)
    session.ready_then_wait()

    async def run() -> None:
        w = Worker(make_queue(args), functions=[bench], concurrency=args.concurrency)
        await w.start()

    P.run_async(run)


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
