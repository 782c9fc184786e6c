"""Dramatiq adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py). Run by its own venv.

Settings: ``RedisBroker`` with the default middleware, one ``Worker`` with ``worker_threads=c`` (Dramatiq's
concurrency is threads), actor ``max_retries=0``. Dramatiq's client is synchronous (``send`` blocks), so
there is no concurrent-producer row, and it has no bulk enqueue API.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).parent))
import _protocol as P  # run with -P: this folder is appended to sys.path, never put first


def info(args: Any) -> None:
    import dramatiq

    P.emit(
        {
            "name": "Dramatiq",
            "version": dramatiq.__version__,
            "parser": P.redis_parser(),
            "guarantee": "ack after run; unacked messages of a dead worker requeued after its heartbeat "
            "timeout (60 s): at-least-once",
            "settings": "RedisBroker, default middleware, worker_threads=c, max_retries=0",
            "bulk": False,
            "concurrent": False,
            "keys": ["dramatiqbench-{ns}*"],
        }
    )


def build(args: Any, tally: P.Tally | None = None) -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=args.url, namespace=f"dramatiqbench-{args.ns}")
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name="bench", queue_name="bench", max_retries=0)
    def bench(ts: int, sleep: float) -> None:
        assert tally is not None
        tally.begin(ts)
        if sleep:
            time.sleep(sleep)
        tally.end()

    return broker, bench


def enqueue(args: Any) -> None:
    _, bench = build(args)
    n, sleep = args.n, args.sleep

    def go() -> None:
        t0 = time.monotonic()
        for i in range(n):
            if args.mode == "paced":
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            bench.send(time.time_ns(), sleep)

    P.timed(go, n)


def worker(args: Any) -> None:
    import dramatiq

    tally = P.Tally(args.latency)
    broker, _ = build(args, tally)
    session = P.WorkerSession(tally)
    session.ready_then_wait()
    w = dramatiq.Worker(broker, worker_threads=args.concurrency)
    w.start()
    threading.Event().wait()  # the protocol's stdin thread ends the process


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
