"""Profile targets for py-spy (issue #6): one-at-a-time adds, and an I/O-bound worker; plus a summariser.

    py-spy record -r 250 -f raw -o /tmp/add.txt -- python benchmarks/profile.py add-one 20000
    py-spy record -r 250 -f raw -o /tmp/io.txt  -- python benchmarks/profile.py io-bound 5000
    python benchmarks/profile.py summarize /tmp/add.txt     # shares of samples, by frame

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
    parser.add_argument("target", choices=["add-one", "io-bound", "summarize"])
    parser.add_argument("arg", help="jobs (add-one, io-bound) or a py-spy raw file (summarize)")
    args = parser.parse_args()
    if args.target == "summarize":
        summarize(args.arg)
        return
    run = add_one if args.target == "add-one" else io_bound
    with local_server() as url:
        asyncio.run(run(url, int(args.arg)))


if __name__ == "__main__":
    main()
