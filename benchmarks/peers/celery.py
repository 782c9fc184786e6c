"""Celery adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py). Run by Celery's own venv.

Fastest documented settings for a no-op job: Redis broker, ``task_ignore_result``, early acks (the
default), ``--without-gossip --without-mingle --without-heartbeat``, and the ``threads`` pool with
concurrency c (one process running c jobs at once, like the others). The client is synchronous, so there is
no concurrent-producer row; no bulk enqueue API (a ``group`` publishes one message at a time).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).parent))
import _protocol as P  # run with -P: this folder is appended to sys.path, never put first


def info(args: Any) -> None:
    import celery

    P.emit(
        {
            "name": "Celery",
            "version": celery.__version__,
            "parser": P.redis_parser(),
            "guarantee": "ack on receipt, before the run (default): a job running when its worker "
            "crashes is lost",
            "settings": "threads pool c, ignore_result, no gossip/mingle/heartbeat, prefetch x4",
            "bulk": False,
            "concurrent": False,
            "keys": ["celerybench-{ns}*"],
        }
    )


def build(args: Any, tally: P.Tally | None = None) -> tuple[Any, Any]:
    from celery import Celery

    app = Celery("bench", broker=args.url, set_as_current=True)
    app.conf.update(
        task_default_queue=f"celerybench-{args.ns}",
        task_ignore_result=True,
        broker_transport_options={"global_keyprefix": f"celerybench-{args.ns}:"},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )

    @app.task(name="bench")
    def bench(ts: int, sleep: float) -> None:
        assert tally is not None
        tally.begin(ts)
        if sleep:
            time.sleep(sleep)
        tally.end()

    return app, bench


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
            bench.delay(time.time_ns(), sleep)

    P.timed(go, n)


def worker(args: Any) -> None:
    tally = P.Tally(args.latency)
    app, _ = build(args, tally)
    session = P.WorkerSession(tally)
    session.ready_then_wait()
    w = app.Worker(
        pool="threads",
        concurrency=args.concurrency,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        loglevel="WARNING",
        quiet=True,
    )
    w.start()


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
