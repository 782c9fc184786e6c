"""The raw redis-py limit on the same server (protocol: benchmarks/peers/_protocol.py).

Not a job queue: the least work a Redis list queue can do with redis-py's asyncio client.

- one at a time: one awaited ``LPUSH`` per job (one round trip, nothing else);
- bulk: pipelines of 100 ``LPUSH``;
- drain: a minimal *reliable* consumer: one Lua call claims up to ``--concurrency`` jobs (``RPOP count`` +
  ``ZADD active`` with a deadline, so a crash leaves them visible), the handler runs, then the acks go out as
  one pipeline of ``ZREM``. One batch at a time; no envelope, no token, no retention.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).parent))
import _protocol as P  # run with -P: this folder is appended to sys.path, never put first

CLAIM = """
local ids = redis.call('RPOP', KEYS[1], ARGV[1])
if not ids then return {} end
local deadline = tonumber(ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[2], deadline, id) end
return ids
"""
PIPELINE = 100


def client(args: Any) -> Any:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(args.url, socket_timeout=10)


def info(args: Any) -> None:
    import redis

    P.emit(
        {
            "name": "redis-py raw",
            "version": redis.__version__,
            "parser": P.redis_parser(),
            "guarantee": "the limit, not a queue: Lua claim into an 'active' zset, ZREM acks",
            "settings": "LPUSH per round trip; pipelines of 100; claim 100 + pipelined acks",
            "bulk": True,
            "concurrent": False,
            "keys": ["rawbench-{ns}:*"],
        }
    )


def payload(sleep: float) -> bytes:
    return f"{time.time_ns()} {sleep}".encode()


async def enqueue(args: Any) -> None:
    r = client(args)
    key = f"rawbench-{args.ns}:wait"
    n, sleep = args.n, args.sleep
    await r.ping()  # connect before the clock starts, as the queues' clients do on their first call
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
                    await r.lpush(key, payload(sleep))

        else:

            async def go() -> None:
                for start in range(0, n, PIPELINE):
                    async with r.pipeline(transaction=False) as pipe:
                        for _ in range(min(PIPELINE, n - start)):
                            pipe.lpush(key, payload(sleep))
                        await pipe.execute()

        await P.timed_async(go, n)
    finally:
        await r.aclose()


async def consume(args: Any, tally: P.Tally) -> None:
    r = client(args)
    wait, active = f"rawbench-{args.ns}:wait", f"rawbench-{args.ns}:active"
    claim = r.register_script(CLAIM)
    batch = args.concurrency
    while True:
        ids = await claim(keys=[wait, active], args=[batch, int(time.time() * 1000) + 30_000])
        if not ids:
            await asyncio.sleep(0.001)
            continue
        for job in ids:
            ts, sleep = job.split()
            tally.begin(int(ts))
            if float(sleep):
                await asyncio.sleep(float(sleep))
            tally.end()
        async with r.pipeline(transaction=False) as pipe:
            for job in ids:
                pipe.zrem(active, job)
            await pipe.execute()


def worker(args: Any) -> None:
    tally = P.Tally(args.latency)
    session = P.WorkerSession(tally)
    session.ready_then_wait()
    P.run_async(lambda: consume(args, tally))


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
