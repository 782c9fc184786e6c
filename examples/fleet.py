"""A fleet of supervised worker processes: run it, watch it, scale it without restarting anyone.

    qflow worker examples.fleet:app -p 4 -c 10      # 4 processes, each running up to 10 jobs per processor
    qflow status examples.fleet:app                 # every live worker process, fleet-wide
    python examples/fleet.py enqueue 2000           # give them work (emails and thumbnails)
    qflow info examples.fleet:app                   # per-queue counts and throughput
    kill -TTIN <supervisor pid>                     # a 5th process; the other 4 keep their pids
    qflow scale examples.fleet:app 3                # or any count, from another terminal

    python examples/fleet.py demo                   # all of the above in one go, checked

``email`` is I/O-bound (an ``async`` processor awaiting a slow service): concurrency serves it.
``thumbnails`` is CPU-bound (a ``def`` processor crunching for ~20 ms): processes serve it. Give it its
own pool with ``qflow worker examples.fleet:app -q thumbnails -p 4 -c 1``.

The app takes its Redis URL from ``QFLOW_REDIS_URL`` (or ``REDIS_URL``); with neither, qflow's embedded
development server under ``./.qflow`` is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

import qflow

app = qflow.App(prefix=os.environ.get("QFLOW_EXAMPLE_PREFIX", "fleet"))
email = app.queue("email")
thumbnails = app.queue("thumbnails")


class Email(msgspec.Struct, frozen=True):
    """Who to write to."""

    to: str
    subject: str


@email.processor(concurrency=10, timeout=30, attempts=3, backoff=qflow.Backoff(delay=1.0, jitter=0.5))
async def send_email(job: qflow.Job[Email]) -> str:
    """Pretend to talk to a mail service: 50-150 ms of waiting, no CPU."""
    await asyncio.sleep(0.05 + 0.1 * random.random())
    return f"sent to {job.payload.to} by pid {os.getpid()}"


@thumbnails.processor(concurrency=1, timeout=60)
def make_thumbnail(job: qflow.Job[int]) -> int:
    """Pretend to resize an image: ~20 ms of pure-Python CPU work (a ``def``: it runs in a thread)."""
    deadline = time.perf_counter() + 0.02
    x = job.payload
    while time.perf_counter() < deadline:
        x = (x * 1103515245 + 12345) % 2**31
    return os.getpid()


ROOT = Path(__file__).resolve().parents[1]
TARGET = "examples.fleet:app"


async def enqueue(n: int) -> None:
    """Add ``n`` jobs, half emails and half thumbnails."""
    async with app:
        await email.add_bulk(
            qflow.JobSpec("send_email", Email(to=f"user{i}@example.com", subject="hi")) for i in range(n // 2)
        )
        await thumbnails.add_bulk(qflow.JobSpec("make_thumbnail", i) for i in range(n - n // 2))
        print(f"enqueued {n} jobs")


def _qflow(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "qflow", *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout


def _pids() -> set[int]:
    return {w["pid"] for w in json.loads(_qflow("status", TARGET, "--json"))}


def _drained() -> bool:
    return all(q["waiting"] + q["active"] == 0 for q in json.loads(_qflow("info", TARGET, "--json")))


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def demo() -> int:
    """Acceptance 1 of issue #3: 4 processes, listed by `qflow status`; SIGTTIN makes 5, same 4 pids."""
    sup = subprocess.Popen(
        [sys.executable, "-m", "qflow", "worker", TARGET, "-p", "4", "-c", "10", "--log-level", "WARNING"],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        _wait_for("4 worker processes in `qflow status`", lambda: len(_pids()) == 4)
        four = _pids()
        print(_qflow("status", TARGET))
        asyncio.run(enqueue(400))
        sup.send_signal(signal.SIGTTIN)
        _wait_for("a 5th worker process", lambda: len(_pids()) == 5)
        five = _pids()
        print(_qflow("status", TARGET))
        print(f"after SIGTTIN: {len(five)} processes; the first 4 kept their pids: {four <= five}")
        _wait_for("the queues to empty", _drained, timeout=60)
        print(_qflow("info", TARGET))
        return 0 if four <= five else 1
    finally:
        sup.send_signal(signal.SIGTERM)
        try:
            print(f"supervisor exited with {sup.wait(60)}")
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()


def main() -> int:
    """``python examples/fleet.py enqueue N`` or ``python examples/fleet.py demo``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("enqueue").add_argument("n", type=int, nargs="?", default=1000)
    sub.add_parser("demo")
    args = parser.parse_args()
    if args.cmd == "enqueue":
        asyncio.run(enqueue(args.n))
        return 0
    return demo()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
