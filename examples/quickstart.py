"""Quickstart: supervised worker processes take a batch of jobs off a queue; see who ran what.

    python examples/quickstart.py                   # 200 jobs, 2 worker processes
    python examples/quickstart.py --jobs 1000 -p 4  # more of both

What it does, in the roles qflow keeps apart:

1. starts ``qflow worker examples.quickstart:app -p 2`` as a subprocess: a supervisor and two worker
   processes, each importing this module and running ``crunch`` up to 5 jobs at a time;
2. acts as the producer: enqueues the batch in one round trip per 500 jobs, then only watches the counts;
3. stops the workers with SIGTERM (they drain and exit 0) and prints which worker process ran how many
   jobs; each job returns the pid of the process that ran it.

No Redis to install: with no ``QFLOW_REDIS_URL`` (or ``REDIS_URL``) set, the first qflow process starts the
project's embedded Valkey server under ``./.qflow`` and every later one, the workers included, attaches to
it. The server outlives this script (its pid is in ``.qflow/valkey.pid``), so a second run reuses it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qflow

app = qflow.App()
work = app.queue("quickstart")


@work.processor(concurrency=5)
async def crunch(job: qflow.Job[int]) -> int:
    """Pretend to call a slow service (50-150 ms of waiting), then say which process did the work."""
    await asyncio.sleep(0.05 + 0.1 * random.random())
    return os.getpid()


ROOT = Path(__file__).resolve().parents[1]  # so the workers can import `examples.quickstart`
STOP_TIMEOUT = 30.0


def start_workers(processes: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m qflow worker examples.quickstart:app -p N`` in its own session, logging to a file."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qflow", "worker", "examples.quickstart:app", "-p", str(processes)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C here reaches only us; we stop the workers ourselves
        )


def stop_workers(workers: subprocess.Popen[bytes]) -> int:
    """SIGTERM (drain and exit), wait up to STOP_TIMEOUT, then SIGKILL. Returns the exit code."""
    if workers.poll() is None:
        workers.send_signal(signal.SIGTERM)
    try:
        return workers.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        workers.kill()
        return workers.wait()


def progress_line(done: int, total: int, counts: dict[str, int], elapsed: float) -> str:
    width = 30
    filled = width * done // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    return (
        f"[{bar}] {done:>5}/{total} done  {counts['active']:>3} running  "
        f"{counts['waiting']:>5} waiting  {elapsed:5.1f}s"
    )


async def produce_and_watch(total: int, workers: subprocess.Popen[bytes]) -> tuple[list[int], float]:
    """Enqueue ``total`` jobs, show progress until all are done; return each job's pid and the time taken."""
    interactive = sys.stdout.isatty()
    async with app:
        before = (await work.stats()).get("completed", 0)
        started = time.monotonic()
        jobs = await work.add_bulk(qflow.JobSpec("crunch", i) for i in range(total))
        deadline = started + 60 + total * 0.05
        last_print = 0.0
        while True:
            now = time.monotonic()
            done = min((await work.stats()).get("completed", 0) - before, total)
            if interactive or now - last_print >= 1.0 or done >= total:
                line = progress_line(done, total, await work.counts(), now - started)
                print(f"\r{line}" if interactive else line, end="" if interactive else "\n", flush=True)
                last_print = now
            if done >= total:
                break
            if workers.poll() is not None:
                raise SystemExit(f"\nthe workers exited early with code {workers.returncode}")
            if now > deadline:
                raise SystemExit(f"\ngave up after {now - started:.0f}s with {done}/{total} jobs done")
            await asyncio.sleep(0.1)
        if interactive:
            print()
        # Every job is done, so each result is already there: this reads them, it does not wait.
        pids = [await job.result(timeout=10) for job in jobs]
        return pids, time.monotonic() - started


def summary(pids: list[int], seconds: float) -> str:
    by_pid = collections.Counter(pids)
    lines = [
        f"{len(pids)} jobs in {seconds:.2f} s ({len(pids) / seconds:,.0f} jobs/s, worker start-up included), "
        f"run by {len(by_pid)} worker process{'es' if len(by_pid) != 1 else ''}:"
    ]
    most = max(by_pid.values())
    for pid, count in sorted(by_pid.items()):
        lines.append(f"  pid {pid:>7}  {'#' * max(1, 30 * count // most):<30}  {count:>5} jobs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200, help="how many jobs to enqueue (default 200)")
    parser.add_argument("-p", "--processes", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.processes < 1:
        parser.error("--jobs and --processes must be >= 1")

    command = f"qflow worker examples.quickstart:app -p {args.processes}"
    print(f"qflow quickstart: {args.jobs} jobs for `{command}`")
    print(f"server: {app.url}")  # resolves it now: starts the embedded server if it must (said on stderr)
    log_path = Path(tempfile.gettempdir()) / f"qflow-quickstart-{os.getpid()}.log"
    workers = start_workers(args.processes, log_path)
    print(f"workers: supervisor pid {workers.pid}, log in {log_path}")
    try:
        pids, seconds = asyncio.run(produce_and_watch(args.jobs, workers))
    finally:
        code = stop_workers(workers)
    print(summary(pids, seconds))
    verdict = "drained and exited cleanly" if code == 0 else "did not exit cleanly: see the log"
    print(f"workers stopped with SIGTERM: exit code {code} ({verdict})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
