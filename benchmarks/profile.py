"""Profile targets for py-spy (issue #6): one-at-a-time adds, and an I/O-bound worker; plus a summariser.

    py-spy record -r 250 -f raw -o /tmp/add.txt -- python benchmarks/profile.py add-one 20000
    py-spy record -r 250 -f raw -o /tmp/io.txt  -- python benchmarks/profile.py io-bound 5000
    python benchmarks/profile.py summarize /tmp/add.txt     # shares of samples, by frame
    python benchmarks/profile.py pickup 1500                # where an idle worker's pickup time goes

Each target starts its own throwaway valkey-server (``qflow.testing.local_server``) and prints its rate.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from typing import Any

import qflow
from qflow.testing import local_server


async def add_one(url: str, n: int) -> None:
    app = qflow.App(url, prefix="profile-add")
    q = app.queue("p")
    await q.add("x", 0)  # connect and load the script before timing
    t0 = time.perf_counter()
    for i in range(n):
        await q.add("x", i)
    print(f"{n / (time.perf_counter() - t0):,.0f} adds/s (one awaited add at a time)")
    await app.close()


async def io_bound(url: str, n: int) -> None:
    app = qflow.App(url, prefix="profile-io")
    q = app.queue("p")
    first = last = 0.0

    @q.processor(concurrency=100)
    async def job(j: qflow.Job[Any]) -> None:
        nonlocal first, last
        first = first or time.perf_counter()
        await asyncio.sleep(0.05)
        last = time.perf_counter()

    await q.add_bulk(qflow.JobSpec("job", i) for i in range(n))
    await app.run_worker(burst=True)
    rate = n / (last - first)
    print(f"{rate:,.0f} jobs/s = {100 * rate / 2000:.1f}% of the ideal 2,000/s (sleep(0.05) at c=100)")
    await app.close()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6


async def _pickup_once(url: str, n: int, behind: bool, claimed: dict[str, float]) -> dict[str, list[float]]:
    worker_settings = qflow.WorkerSettings(claim_behind_wait=behind)
    app = qflow.App(url, prefix=f"profile-pickup-{int(behind)}", worker=worker_settings)
    q = app.queue("p")
    stamps: dict[str, tuple[float, float]] = {}
    began: dict[str, float] = {}
    all_began = asyncio.Event()

    @q.processor(concurrency=100)
    async def job(j: qflow.Job[Any]) -> None:
        began[j.id] = time.perf_counter()
        if len(began) == n:
            all_began.set()

    worker = qflow.Worker(app)
    task = asyncio.create_task(worker.run())
    await worker.ready.wait()
    await asyncio.sleep(0.5)  # let the fetcher park on the server: the worker is idle when jobs come
    for i in range(n):
        t0 = time.perf_counter()
        handle = await q.add("job", i)
        stamps[handle.id] = (t0, time.perf_counter())
        await asyncio.sleep(0.002)  # about 500 jobs/s
    await asyncio.wait_for(all_began.wait(), 30)
    worker.stop()
    await task
    await app.close()
    ids = list(stamps)[n // 10 :]  # the first tenth warms up
    return {
        "add() returned": [stamps[i][1] - stamps[i][0] for i in ids],
        "claim reply processed": [claimed[i] - stamps[i][0] for i in ids],
        "handler began": [began[i] - stamps[i][0] for i in ids],
        "  claim reply -> handler": [began[i] - claimed[i] for i in ids],
    }


async def pickup(url: str, n: int) -> None:
    """Pickup latency of an idle worker at about 500 jobs/s, split where the worker sees the job.

    Stamps (``time.perf_counter``, one process): before ``add``; ``add`` returned; the claim reply reached
    ``Lanes.start`` (wrapped here); the handler began. Run for the default and ``claim_behind_wait``.
    """
    from qflow._worker import lanes as _lanes

    claimed: dict[str, float] = {}
    real_start = _lanes.Lanes.start

    def start(self: Any, r: Any, d: Any) -> None:
        claimed[d.id] = time.perf_counter()
        real_start(self, r, d)

    _lanes.Lanes.start = start  # type: ignore[method-assign]  # a measuring hook, this process only
    for behind in (False, True):
        rows = await _pickup_once(url, n, behind, claimed)
        print(f"claim_behind_wait={behind}: microseconds after the producer called add() (p50 / p99)")
        for name, values in rows.items():
            print(f"  {name:26} {_pct(values, 50):8,.0f} / {_pct(values, 99):8,.0f}")


def summarize(path: str, top: int = 30) -> None:
    """Shares of a py-spy ``-f raw`` profile: by innermost frame, and by every frame on the stack."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] += n
            for name in {frame.split(" (")[0] for frame in frames}:
                within[name] += n
    print(f"{total} samples\n-- innermost frame")
    for name, n in own.most_common(top // 2):
        print(f"{100 * n / total:5.1f}%  {name[:120]}")
    print("-- on the stack")
    for name, n in within.most_common(top):
        print(f"{100 * n / total:5.1f}%  {name[:120]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", choices=["add-one", "io-bound", "pickup", "summarize"])
    parser.add_argument("arg", help="jobs (add-one, io-bound, pickup) or a py-spy raw file (summarize)")
    args = parser.parse_args()
    if args.target == "summarize":
        summarize(args.arg)
        return
    run = {"add-one": add_one, "io-bound": io_bound, "pickup": pickup}[args.target]
    with local_server() as url:
        asyncio.run(run(url, int(args.arg)))


if __name__ == "__main__":
    main()
