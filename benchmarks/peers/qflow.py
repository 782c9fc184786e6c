"""qflow adapter for benchmarks/run.py (protocol: benchmarks/peers/_protocol.py).

One queue named after the namespace, prefix ``qflowbench-<ns>``; worker defaults (30 s leases, claim
batches of up to 100), concurrency from ``--concurrency``.
"""

# No `from __future__ import annotations`: qflow resolves the handler's `Job[...]` annotation, and qflow is
# imported inside functions (after _protocol.configure()), so the annotation must be evaluated in place.
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).parent))
import _protocol as P  # run with -P: this folder is appended to sys.path, never put first

CHUNK = 2_000  # concurrent mode: adds gathered at once
CLAIM_BEHIND = os.environ.get("QFLOW_BENCH_CLAIM_BEHIND") == "1"


def build(args: Any) -> tuple[Any, Any, P.Tally]:
    import qflow

    retention = (
        qflow.RetentionSettings(completed_count=args.retain, completed_age=None)
        if args.retain
        else qflow.RetentionSettings()
    )
    # QFLOW_BENCH_CLAIM_BEHIND=1 (run.py --claim-behind): the idle worker's claim rides behind its wait.
    # (Only then is the option passed: an older engine given with --candidate does not know it.)
    extra = {"worker": qflow.WorkerSettings(claim_behind_wait=True)} if CLAIM_BEHIND else {}
    app = qflow.App(args.url, prefix=f"qflowbench-{args.ns}", retention=retention, **extra)
    queue = app.queue("bench")
    tally = P.Tally(args.latency)

    @queue.processor
    async def bench(job: qflow.Job[Any]) -> None:
        ts, sleep = job.payload
        tally.begin(ts)
        if sleep:
            await asyncio.sleep(sleep)
        tally.end()

    return app, queue, tally


def info(args: Any) -> None:
    import qflow

    P.emit(
        {
            "name": "qflow",
            "version": qflow.__version__,
            "parser": P.redis_parser(),
            "guarantee": "ack after run; lease + fencing token, at-least-once, redelivered after a crash",
            "settings": "defaults (30 s lease, claim batches <= 100, claim-ahead, batched acks)"
            + (", claim_behind_wait" if CLAIM_BEHIND else ""),
            "bulk": True,
            "concurrent": True,
            "keys": ["qflowbench-{ns}:*"],
        }
    )


async def enqueue(args: Any) -> None:
    import qflow

    app, queue, _ = build(args)
    n, sleep = args.n, args.sleep
    try:
        if args.mode == "one":

            async def go() -> None:
                for _ in range(n):
                    await queue.add("bench", (time.time_ns(), sleep))

        elif args.mode == "bulk":

            async def go() -> None:
                ts = time.time_ns()
                await queue.add_bulk(qflow.JobSpec("bench", (ts, sleep)) for _ in range(n))

        elif args.mode == "concurrent":

            async def go() -> None:
                for start in range(0, n, CHUNK):
                    await asyncio.gather(
                        *(queue.add("bench", (time.time_ns(), sleep)) for _ in range(min(CHUNK, n - start)))
                    )

        else:

            async def go() -> None:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                for due in P.paced(n, args.rate):
                    delay = t0 + due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await queue.add("bench", (time.time_ns(), sleep))

        await P.timed_async(go, n)
    finally:
        await app.close()


def worker(args: Any) -> None:
    app, _, tally = build(args)
    session = P.WorkerSession(tally)
    session.ready_then_wait()
    P.run_async(lambda: app.run_worker(concurrency=args.concurrency))


def main() -> None:
    P.main(info, enqueue, worker)


if __name__ == "__main__":
    main()
