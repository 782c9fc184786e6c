"""A CPU-bound processor: write it as plain ``def``, so it never freezes the worker's event loop.

    python -m examples.patterns.sync_cpu

qflow runs a ``def`` processor in a thread. The event loop keeps running between the interpreter's thread
switches (every 5 ms by default), so it still renews leases, takes jobs and runs other processors while the
job computes. The same work in an ``async def`` processor holds the loop for its whole run, and jobs that
become ready together run back to back without a single pause. This script measures the longest pause of
the event loop while each kind runs; on a busy machine both numbers grow, but far apart.

A thread is not a core, though: Python runs one thread's bytecode at a time, so CPU-bound jobs scale with
*processes*. Give them their own: ``qflow worker examples.patterns.sync_cpu:app -q patterns-cpu -p 4``.
"""

from __future__ import annotations

import asyncio
import time

import qflow

app = qflow.App()
cpu = app.queue("patterns-cpu")


def count_primes(below: int) -> int:
    """Deliberately slow pure-Python work."""
    return sum(1 for n in range(2, below) if all(n % d for d in range(2, int(n**0.5) + 1)))


@cpu.processor(concurrency=2)
def primes(job: qflow.Job[int]) -> int:
    """Runs in a worker thread: the event loop keeps going."""
    return count_primes(job.payload)


@cpu.processor(concurrency=2)
async def primes_on_the_loop(job: qflow.Job[int]) -> int:
    """Never awaits: the event loop is stuck until it returns. Don't do this."""
    return count_primes(job.payload)


async def longest_loop_pause(work: asyncio.Task[None]) -> float:
    """Tick every millisecond until ``work`` is done; return the longest gap between ticks, in ms."""
    longest = 0.0
    last = time.perf_counter()
    while not work.done():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    await work
    return longest * 1000


async def main() -> None:
    async with app:
        for name in ("primes", "primes_on_the_loop"):
            jobs = [await cpu.add(name, 40_000) for _ in range(4)]
            started = time.perf_counter()
            pause = await longest_loop_pause(asyncio.create_task(app.run_worker(burst=True)))
            took = time.perf_counter() - started
            results = {await job.result(timeout=1) for job in jobs}
            summary = f"4 jobs in {took:.2f} s, {results} primes each"
            print(f"{name:>18}: {summary}, longest loop pause {pause:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
