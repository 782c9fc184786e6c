"""Quickstart: supervised worker processes take a batch of jobs off a queue; see who ran what.

    python examples/quickstart.py                   # 200 jobs, 2 worker processes
    python examples/quickstart.py --jobs 1000 -p 4  # more of both

What it does, in the roles qflow keeps apart:

1. starts ``qflow worker examples.quickstart:app -p 2`` as a subprocess: a supervisor and two worker
   processes, each importing this module and running ``crunch`` up to 5 jobs at a time;
2. acts as the producer: enqueues the batch in one round trip per 500 jobs, then only watches the counts:
   jobs running (never more than processes x concurrency) apart from jobs claimed ahead (leased by a worker
   process, waiting for one of its slots), as the workers' heartbeats report them;
3. stops the workers with SIGTERM (they drain and exit 0) and prints which worker process ran how many
   jobs; each job returns the pid of the process that ran it.

No Redis to install: with no ``QFLOW_REDIS_URL`` (or ``REDIS_URL``) set, the first qflow process starts the
project's embedded Valkey server in the project's ``.qflow`` directory and every later one, the workers
included, attaches to it. The server outlives this script, so a second run reuses it; ``qflow server stop``
stops it. The workers' log is ``.qflow/quickstart.log`` (overwritten by each run).
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
import time
from pathlib import Path

import qflow

# Not public API yet: where the embedded server lives, and the heartbeats `qflow status` reads.
from qflow._embedded import server_for
from qflow._inspect import list_workers

app = qflow.App()
work = app.queue("quickstart")
CONCURRENCY = 5


@work.processor(concurrency=CONCURRENCY)
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


async def running_and_ahead(supervisor_pid: int) -> tuple[int, int]:
    """Jobs running and jobs claimed ahead on this queue, summed over our supervisor's worker processes.

    Each worker process reports both in its heartbeat (at most ~0.5 s old). The queue's ``active`` count
    would mix them: a worker claims a few jobs ahead of a free slot, so that count can exceed
    processes x concurrency while the jobs running never do.
    """
    running = ahead = 0
    for w in await list_workers(app):
        if w.supervisor_pid == supervisor_pid and work.name in w.load:
            running += w.load[work.name].running
            ahead += w.load[work.name].claimed_ahead
    return running, ahead


def progress_line(done: int, total: int, running: int, ahead: int, waiting: int, elapsed: float) -> str:
    width = 30
    filled = width * done // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    return (
        f"[{bar}] {done:>5}/{total} done  {running:>3} running  {ahead:>3} claimed ahead  "
        f"{waiting:>5} waiting  {elapsed:5.1f}s"
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
                running, ahead = await running_and_ahead(workers.pid)
                waiting = (await work.counts())["waiting"]
                # A heartbeat can be half a second old; jobs not done and not waiting bound both counts.
                started_or_claimed = max(0, total - done - waiting)
                running = min(running, started_or_claimed)
                ahead = min(ahead, started_or_claimed - running)
                line = progress_line(done, total, running, ahead, waiting, now - started)
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
    capacity = args.processes * CONCURRENCY
    print(f"qflow quickstart: {args.jobs} jobs for `{command}`")
    print(f"server: {app.resolve_url()}")  # starts the embedded server if it must (said on stderr)
    embedded = server_for()
    log_path = embedded.home / "quickstart.log"  # the project's .qflow directory, whichever server is used
    log_path.parent.mkdir(parents=True, exist_ok=True)
    workers = start_workers(args.processes, log_path)
    print(f"workers: supervisor pid {workers.pid}, log in {log_path}")
    print(
        f"capacity: {args.processes} processes x concurrency {CONCURRENCY} = {capacity} jobs running at once"
    )
    try:
        pids, seconds = asyncio.run(produce_and_watch(args.jobs, workers))
    finally:
        code = stop_workers(workers)
    print(summary(pids, seconds))
    verdict = "drained and exited cleanly" if code == 0 else f"did not exit cleanly: see {log_path}"
    print(f"workers stopped with SIGTERM: exit code {code} ({verdict})")
    if app.resolve_url() == embedded.url:
        print(
            f"the embedded Valkey server keeps running (data in {embedded.home}), so the next run reuses "
            "it; stop it with `qflow server stop`"
        )
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
