"""taskiq-redis adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py). Own venv.

Fastest documented broker for a no-op job: ``ListQueueBroker`` (LPUSH / BRPOP, no acknowledgement), no
result backend, ``max_async_tasks=c``. (``RedisStreamBroker`` acknowledges, at some cost.) No bulk API.
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
            "name": "taskiq-redis",
            "version": f"{version('taskiq')} / taskiq-redis {version('taskiq-redis')}",
            "parser": P.redis_parser(),
            "guarantee": "no ack (BRPOP): a job taken by a worker that crashes is lost (at-most-once)",
            "settings": "ListQueueBroker, no result backend, max_async_tasks=c",
            "bulk": False,
            "concurrent": True,
            "keys": ["taskiqbench-{ns}*"],
        }
    )


def build(args: Any, tally: P.Tally | None = None) -> tuple[Any, Any]:
    from taskiq_redis import ListQueueBroker

    broker = ListQueueBroker(args.url, queue_name=f"taskiqbench-{args.ns}")

    @broker.task(task_name="bench")
    async def bench(ts: int, sleep: float) -> None:
        assert tally is not None
        tally.begin(ts)
        if sleep:
            await asyncio.sleep(sleep)
        tally.end()

    return broker, bench


async def enqueue(args: Any) -> None:
    broker, bench = build(args)
    await broker.startup()
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
                    await bench.kiq(time.time_ns(), sleep)

        else:

            async def go() -> None:
                for start in range(0, n, CHUNK):
                    await asyncio.gather(
                        *(bench.kiq(time.time_ns(), sleep) for _ in range(min(CHUNK, n - start)))
                    )

        await P.timed_async(go, n)
    finally:
        await broker.shutdown()


def worker(args: Any) -> None:
    from taskiq.api import run_receiver_task

    tally = P.Tally(args.latency)
    broker, _ = build(args, tally)
    session = P.WorkerSession(tally)
    session.ready_then_wait()

    async def run() -> None:
        broker.is_worker_process = True
        await broker.startup()
        await run_receiver_task(broker, max_async_tasks=args.concurrency)

    P.run_async(run)


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
