"""streaQ adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py). Run by streaQ's own venv.

Settings: ``Worker(concurrency=c, handle_signals=False)``, task ``silent=True`` (no per-task log lines),
defaults otherwise (results kept 5 min). Bulk API: ``Worker.enqueue_many`` (one pipeline). streaQ talks
to Redis with coredis, not redis-py.
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
            "name": "streaQ",
            "version": version("streaq"),
            "parser": f"coredis {version('coredis')}",
            "guarantee": "ack after run (stream consumer group); reclaimed after idle_timeout (60 s): "
            "at-least-once",
            "settings": "concurrency=c, silent tasks, defaults otherwise",
            "bulk": True,
            "concurrent": True,
            "keys": ["streaq:streaqbench-{ns}*"],
        }
    )


def build(args: Any, tally: P.Tally | None = None) -> tuple[Any, Any]:
    from streaq import Worker

    worker = Worker(
        redis_url=args.url,
        queue_name=f"streaqbench-{args.ns}",
        concurrency=args.concurrency,
        handle_signals=False,
    )

    @worker.task(name="bench", silent=True)
    async def bench(ts: int, sleep: float) -> None:
        assert tally is not None
        tally.begin(ts)
        if sleep:
            await asyncio.sleep(sleep)
        tally.end()

    return worker, bench


async def enqueue(args: Any) -> None:
    worker, bench = build(args)
    n, sleep = args.n, args.sleep
    async with worker:
        if args.mode in ("one", "paced"):

            async def go() -> None:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                for i in range(n):
                    if args.mode == "paced":
                        delay = t0 + i / args.rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await bench.enqueue(time.time_ns(), sleep)

        elif args.mode == "bulk":

            async def go() -> None:
                ts = time.time_ns()
                for start in range(0, n, CHUNK):
                    batch = [bench.enqueue(ts, sleep) for _ in range(min(CHUNK, n - start))]
                    await worker.enqueue_many(batch)

        else:

            async def go() -> None:
                for start in range(0, n, CHUNK):
                    await asyncio.gather(
                        *(_await(bench.enqueue(time.time_ns(), sleep)) for _ in range(min(CHUNK, n - start)))
                    )

        await P.timed_async(go, n)


async def _await(task: Any) -> Any:
    return await task


def worker(args: Any) -> None:
    tally = P.Tally(args.latency)
    w, _ = build(args, tally)
    session = P.WorkerSession(tally)
    session.ready_then_wait()
    P.run_async(w.run_async)


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
