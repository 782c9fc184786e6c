"""arq adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py). Run by arq's own venv.

Fastest documented settings for a no-op job: ``max_jobs`` = concurrency, ``poll_delay`` 5 ms (default 0.5 s:
arq polls its queue and sleeps ``poll_delay`` between polls even when busy), ``keep_result=0``, result
logging off. arq has no bulk enqueue API.
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
    import arq

    P.emit(
        {
            "name": "arq",
            "version": arq.VERSION,
            "parser": P.redis_parser(),
            "guarantee": "ack after run; job stays queued, in-progress key expires after the job timeout "
            "(300 s): rerun after a crash (at-least-once, late)",
            "settings": "max_jobs=c, poll_delay=5 ms, keep_result=0, log_results=False",
            "bulk": False,
            "concurrent": True,
            "keys": ["arqbench-{ns}*", "arq:job:*", "arq:in-progress:*", "arq:result:*", "arq:retry:*"],
        }
    )


def settings(args: Any) -> Any:
    from arq.connections import RedisSettings

    return RedisSettings.from_dsn(args.url)


async def enqueue(args: Any) -> None:
    from arq import create_pool

    redis = await create_pool(settings(args), default_queue_name=f"arqbench-{args.ns}")
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
                    await redis.enqueue_job("bench", time.time_ns(), sleep)

        else:

            async def go() -> None:
                for start in range(0, n, CHUNK):
                    await asyncio.gather(
                        *(
                            redis.enqueue_job("bench", time.time_ns(), sleep)
                            for _ in range(min(CHUNK, n - start))
                        )
                    )

        await P.timed_async(go, n)
    finally:
        await redis.aclose()


def worker(args: Any) -> None:
    from arq.worker import Worker, func

    tally = P.Tally(args.latency)

    async def bench(ctx: Any, ts: int, sleep: float) -> None:
        tally.begin(ts)
        if sleep:
            await asyncio.sleep(sleep)
        tally.end()

    session = P.WorkerSession(tally)
    session.ready_then_wait()

    async def run() -> None:
        w = Worker(
            functions=[func(bench, name="bench")],
            queue_name=f"arqbench-{args.ns}",
            redis_settings=settings(args),
            max_jobs=args.concurrency,
            poll_delay=0.005,
            keep_result=0,
            log_results=False,
            handle_signals=False,
        )
        await w.async_run()

    P.run_async(run)


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
