"""Processes vs concurrency, measured: which knob serves which kind of job (issue #3, acceptance 3).

    python benchmarks/processes_vs_concurrency.py [--url redis://...] [--cpu-jobs 200] [--io-jobs 2000]
                                                  [--repeat 3]

Four runs of ``qflow worker benchmarks.processes_vs_concurrency:app --burst``, each on a fresh key prefix:

- CPU-bound: a ``def`` processor doing ~20 ms of pure-Python work (a fixed amount, calibrated once on this
  machine), with ``-p 2 -c 1`` and with ``-p 1 -c 10``;
- I/O-bound: an ``async`` processor doing ``await anyio.sleep(0.05)``, with ``-p 1 -c 100`` and ``-p 1 -c 1``.

Throughput is measured between the first and the last completion (server clock, from the ``completed`` set),
so process start-up is not counted; each case runs ``--repeat`` times and the best run is reported (a shared
machine disturbs some runs). ``cores`` is the CPU time the worker processes used divided by the run's wall
time: the GIL caps one process near 1.0, whatever ``-c`` says. Without ``--url`` (or ``QFLOW_REDIS_URL``)
a throwaway valkey-server is started (``qflow.testing.local_server``). Prints a table and the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio

import qflow
from qflow.testing import local_server

ROOT = Path(__file__).resolve().parents[1]
TARGET = "benchmarks.processes_vs_concurrency:app"


def burn(iterations: int) -> int:
    """A fixed amount of pure-Python work (holds the GIL throughout)."""
    x = 1
    for i in range(iterations):
        x = (x * 1103515245 + i) % 2147483648
    return x


def build(url: str | None, prefix: str) -> qflow.App:
    """The benchmark app: queue ``cpu`` (sync, ~20 ms of CPU) and queue ``io`` (async, 50 ms of waiting)."""
    app = qflow.App(
        url, prefix=prefix, retention=qflow.RetentionSettings(completed_count=1_000_000, completed_age=None)
    )
    iterations = int(os.environ.get("BENCH_CPU_ITERATIONS", "100000"))

    @app.queue("cpu").processor
    def crunch(job: qflow.Job[int]) -> int:
        return burn(iterations)

    @app.queue("io").processor
    async def wait(job: qflow.Job[int]) -> None:
        await anyio.sleep(0.05)

    return app


app = build(os.environ.get("BENCH_REDIS_URL"), os.environ.get("BENCH_PREFIX", "bench"))


def calibrate(seconds: float = 0.02) -> int:
    """Iterations of ``burn`` that take ``seconds`` of CPU time on this machine (best of 5).

    Measured in thread CPU time, not wall time, so other processes competing for the cores while it runs do
    not make the job lighter.
    """
    n = 50_000
    t = min(_timed(n) for _ in range(5))
    return max(1, int(n * seconds / t))


def _timed(n: int) -> float:
    t0 = time.thread_time()
    burn(n)
    return time.thread_time() - t0


async def run_case(
    url: str, queue: str, jobs: int, flags: list[str], iterations: int
) -> tuple[float, float, float]:
    """Enqueue ``jobs``, run a burst worker with ``flags``; return (seconds, jobs/s, cores used)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bench = build(url, prefix)
    q = bench.queues[queue]
    name = "crunch" if queue == "cpu" else "wait"
    try:
        await q.add_bulk(qflow.JobSpec(name, i) for i in range(jobs))
        env = {
            **os.environ,
            "BENCH_REDIS_URL": url,
            "BENCH_PREFIX": prefix,
            "BENCH_CPU_ITERATIONS": str(iterations),
        }
        cmd = [sys.executable, "-m", "qflow", "worker", TARGET, "-q", queue, *flags, "--burst"]
        cmd += ["--log-level", "ERROR"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        await asyncio.to_thread(subprocess.run, cmd, cwd=ROOT, env=env, check=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cores = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall
        counts = await q.counts()
        if counts["completed"] != jobs:
            raise SystemExit(f"{queue} {flags}: {counts['completed']} of {jobs} completed")
        client = bench.redis()
        first = await client.zrange(q.keys.completed, 0, 0, withscores=True)
        last = await client.zrange(q.keys.completed, -1, -1, withscores=True)
        span = (last[0][1] - first[0][1]) / 1000
        return span, (jobs - 1) / span if span > 0 else float("inf"), cores
    finally:
        keys = [k async for k in bench.redis().scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await bench.redis().delete(*keys)
        await bench.close()


async def main(url: str, cpu_jobs: int, io_jobs: int, repeat: int) -> None:
    iterations = calibrate()
    print(f"calibrated: {iterations:,} iterations of pure Python = 20 ms on one core of this machine")
    cases = [
        ("CPU-bound, def, 20 ms", "cpu", cpu_jobs, ["-p", "2", "-c", "1"]),
        ("CPU-bound, def, 20 ms", "cpu", cpu_jobs, ["-p", "1", "-c", "10"]),
        ("I/O-bound, await sleep 50 ms", "io", io_jobs, ["-p", "1", "-c", "100"]),
        ("I/O-bound, await sleep 50 ms", "io", max(20, io_jobs // 20), ["-p", "1", "-c", "1"]),
    ]
    rows = []
    for label, queue, jobs, flags in cases:
        runs = []
        for _ in range(repeat):
            seconds, rate, cores = await run_case(url, queue, jobs, flags, iterations)
            runs.append((seconds, rate, cores))
            print(
                f"  {label:<30} {' '.join(flags):<12} {jobs:>6} jobs {seconds:7.2f}s {rate:9.1f} jobs/s "
                f"{cores:5.2f} cores"
            )
        seconds, rate, cores = max(runs, key=lambda r: r[1])  # best of `repeat`: the least disturbed run
        rows.append((label, " ".join(flags), jobs, seconds, rate, cores))
    print()
    print(f"best of {repeat} runs each:")
    print(f"{'job':<30} {'flags':<12} {'jobs':>6} {'seconds':>8} {'jobs/s':>9} {'vs pair':>8} {'cores':>6}")
    for i, (label, flags, jobs, seconds, rate, cores) in enumerate(rows):
        pair = rows[i - 1 if i % 2 else i + 1][4]
        ratio = f"{rate / pair:.2f}x"
        print(f"{label:<30} {flags:<12} {jobs:>6} {seconds:>8.2f} {rate:>9.1f} {ratio:>8} {cores:>6.2f}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmachine: {os.cpu_count()} cores, load average {load} (other processes skew the CPU-bound pair)")
    print(f"commands: qflow worker {TARGET} -q QUEUE FLAGS --burst")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("QFLOW_REDIS_URL"))
    parser.add_argument("--cpu-jobs", type=int, default=200)
    parser.add_argument("--io-jobs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is reported")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        print(f"server: {url}")
        asyncio.run(main(url, args.cpu_jobs, args.io_jobs, args.repeat))
