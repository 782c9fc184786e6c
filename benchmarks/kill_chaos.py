"""Chaos check: 5,000 jobs while a random worker process is SIGKILLed every 2 s; every job must complete.

    python benchmarks/kill_chaos.py [--jobs 5000] [--every 2.0] [-p 4] [-c 5] [--url redis://...]

Issue #3, acceptance 2. Starts ``qflow worker benchmarks.kill_chaos:app -p 4 -c 5`` (each job awaits
100 ms), enqueues the jobs, and SIGKILLs a random ready worker process every ``--every`` seconds until
every job is completed; the supervisor replaces each one. Each handler run appends one line to a ledger
(one ``write(2)`` on an ``O_APPEND`` file per process, which a SIGKILL cannot tear), so the script can count
jobs that ran more than once (those in flight on a killed process: at-least-once, as documented).

Prints one summary line, ``... lost 0 ...``, and exits 1 if any job did not end ``completed``. Without
``--url`` (or ``QFLOW_REDIS_URL``) a throwaway valkey-server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import qflow
from qflow._cli.control import control_request
from qflow.testing import local_server

ROOT = Path(__file__).resolve().parents[1]
TARGET = "benchmarks.kill_chaos:app"
SETTINGS = qflow.WorkerSettings(lease_ttl=2.0, check_interval=0.5, max_stalls=50, drain_timeout=5.0)


def build(url: str | None, prefix: str) -> qflow.App:
    """The chaos app: queue ``chaos``, processor ``work`` (await 100 ms, then write a ledger line)."""
    app = qflow.App(
        url,
        prefix=prefix,
        worker=SETTINGS,
        retention=qflow.RetentionSettings(completed_count=1_000_000, completed_age=None),
    )
    ledger = os.environ.get("CHAOS_LEDGER")

    def record(line: str) -> None:
        if ledger:
            fd = os.open(Path(ledger) / f"{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{line}\n".encode())
            finally:
                os.close(fd)

    @app.queue("chaos").processor(concurrency=5)
    async def work(job: qflow.Job[int]) -> None:
        record(f"start {job.id}")
        await asyncio.sleep(0.1)
        record(f"end {job.id}")

    return app


def start_supervisor(
    env: dict[str, str], log_path: Path, processes: int, concurrency: int
) -> subprocess.Popen[bytes]:
    """``qflow worker benchmarks.kill_chaos:app -p N -c N`` in its own session, logging to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qflow", "worker", TARGET, "-p", str(processes), "-c", str(concurrency)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def read_ledger(directory: Path) -> tuple[collections.Counter[str], set[str]]:
    """Runs started per job id, and the ids whose run reached its end."""
    starts: collections.Counter[str] = collections.Counter()
    ends: set[str] = set()
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            kind, _, job_id = line.partition(" ")
            if kind == "start":
                starts[job_id] += 1
            elif kind == "end":
                ends.add(job_id)
    return starts, ends


def remove_dir(directory: Path) -> None:
    """Delete a flat directory."""
    for p in directory.glob("*"):
        p.unlink()
    directory.rmdir()


app = build(os.environ.get("CHAOS_REDIS_URL"), os.environ.get("CHAOS_PREFIX", "chaos"))


async def main(url: str, jobs: int, every: float, processes: int, concurrency: int) -> int:
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    ledger = Path(tempfile.mkdtemp(prefix="qflow-chaos-"))
    run_dir = Path(tempfile.mkdtemp(prefix="qfc-", dir="/tmp"))
    chaos = build(url, prefix)
    queue = chaos.queues["chaos"]
    env = {
        **os.environ,
        "CHAOS_REDIS_URL": url,
        "CHAOS_PREFIX": prefix,
        "CHAOS_LEDGER": str(ledger),
        "QFLOW_RUN_DIR": str(run_dir),
    }
    handles = await queue.add_bulk(qflow.JobSpec("work", i) for i in range(jobs))
    ids = [h.id for h in handles]
    log_path = ledger / "supervisor.txt"
    sup = start_supervisor(env, log_path, processes, concurrency)
    sock = run_dir / f"qflow-{sup.pid}.sock"
    kills = 0
    started = time.monotonic()
    deadline = started + max(120.0, jobs / 20)
    next_kill = started + every
    try:
        while time.monotonic() < deadline:
            counts = await queue.counts()
            if counts["completed"] >= jobs:
                break
            if time.monotonic() >= next_kill:
                next_kill += every
                with contextlib.suppress(OSError, ValueError):
                    status = control_request(sock, {"cmd": "status"})
                    ready = [c["pid"] for c in status["children"] if c["ready"] and c["state"] == "active"]
                    if ready:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(random.choice(ready), signal.SIGKILL)
                            kills += 1
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()
    client = chaos.redis()
    states = await client.hmget(queue.keys.state, ids)
    completed = sum(s == b"completed" for s in states)
    starts, ends = read_ledger(ledger)
    again = sum(1 for i in ids if starts[i] > 1)
    never = sum(1 for i in ids if i not in ends)
    lost = max(jobs - completed, never)
    print(
        f"jobs {jobs} completed {completed} lost {lost} | {kills} workers SIGKILLed (one every {every}s) "
        f"in {elapsed:.1f}s | started more than once: {again} (in flight on a killed worker) | "
        f"stats {await queue.stats()}"
    )
    replaced = log_path.read_text().count("killed by SIGKILL")
    print(f"supervisor reaped {replaced} SIGKILLed worker(s); exit code {sup.returncode}; log: {log_path}")
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])
    await chaos.close()
    remove_dir(run_dir)
    return 1 if lost else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=os.environ.get("QFLOW_REDIS_URL"))
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--every", type=float, default=2.0)
    parser.add_argument("-p", "--processes", type=int, default=4)
    parser.add_argument("-c", "--concurrency", type=int, default=5)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        sys.exit(asyncio.run(main(url, args.jobs, args.every, args.processes, args.concurrency)))
