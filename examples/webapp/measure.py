"""Measure API latency while CPU-heavy jobs run inside the API process, versus in separate worker processes.

    python -m examples.webapp.measure              # 3 rounds x 300 requests per scenario at 100/s: ~80 s
    python -m examples.webapp.measure --rounds 1 --requests 50 --scenarios baseline,separate

For each scenario it starts the API (``uvicorn examples.webapp.app:api``) and, where the scenario says so,
``qflow worker examples.webapp.app:app -p N``; fills the ``webapp-reports`` queue with CPU-heavy jobs
(pure-Python loops of about ``--heavy-ms`` each); waits until they are running; then sends ``POST /users``
at a steady ``--rate`` per second (open loop: a slow answer does not hold back the next request), and
times each answer. It prints a Markdown table: latency percentiles of the API, and how many heavy jobs per
second got done meanwhile.

It uses the server qflow would use anyway (``QFLOW_REDIS_URL``, else the embedded one) and purges its own two
queues before and after each scenario. Every process it starts is stopped before it moves on.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

import qflow
from examples.webapp.app import NewUser, app, crunch, reports, send_welcome, welcome

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Scenario:
    title: str
    worker_in_api: bool  # the API process runs a worker in its own event loop
    heavy_job: str | None  # which processor the heavy jobs use (None: no heavy jobs)
    worker_processes: int  # separate `qflow worker -p N` processes (0: none)


SCENARIOS = {
    "baseline": Scenario("no heavy jobs (baseline)", False, None, 1),
    "in-api-def": Scenario(
        "in the API process, `def` processor (runs in a thread)", True, "render_report", 0
    ),
    "in-api-async": Scenario(
        "in the API process, `async def` processor (blocks the loop)", True, "render_report_inline", 0
    ),
    "separate": Scenario("in a separate worker process, `qflow worker -p 1`", False, "render_report", 1),
    "separate-p2": Scenario("in separate worker processes, `qflow worker -p 2`", False, "render_report", 2),
}
UVICORN = ["-m", "uvicorn", "examples.webapp.app:api", "--log-level", "warning", "--no-access-log"]
QFLOW_WORKER = ["-m", "qflow", "worker", "examples.webapp.app:app", "--log-level", "WARNING"]
HEAVY_CONCURRENCY = 2  # render_report / render_report_inline: concurrency=2 per process
HEAVY_BACKLOG = 3000  # more heavy jobs than any scenario gets through; the rest is purged


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    latencies_ms: list[float]
    heavy_per_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def calibrate(ms: float) -> int:
    """Iterations of ``crunch`` that take about ``ms`` milliseconds on this machine."""
    n = 200_000
    best = min(crunch(n) for _ in range(3))
    return max(1_000, int(n * ms / best))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class HTTPClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams.

    It adds about 0.1 ms per request where a full-featured client adds 1-3 ms of its own CPU time, which
    would blur the very latencies being measured (the client shares this machine's cores).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        data = b"" if body is None else msgspec.json.encode(body)
        head = f"{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Length: {len(data)}\r\n"
        if data:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.writer = None


class Processes:
    """The API and worker subprocesses of one scenario; all stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(extra_env or {})
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                log = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"{name} exited with code {proc.returncode}:\n{log}")

    def stop(self) -> None:
        for _, proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, proc in self.started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.started.clear()


async def open_loop(port: int, requests: int, rate: float) -> list[float]:
    """Send ``requests`` POST /users at a steady ``rate``, whether or not earlier ones were answered.

    Like independent users, arrivals do not wait for each other: a slow answer delays no one else's
    request, it only shows up as that request's latency (a client that waits for each answer before
    sending the next would hide most of a stall). Each request goes out on an idle keep-alive connection,
    or a new one. Returns the latencies in ms, each timed from when its request was sent.
    """
    idle: list[HTTPClient] = []
    latencies: list[float] = []

    async def one(i: int) -> None:
        client = idle.pop() if idle else HTTPClient(port)
        t0 = time.perf_counter()
        status, text = await client.request("POST", "/users", {"email": f"u{i}@example.com", "name": f"U{i}"})
        latencies.append((time.perf_counter() - t0) * 1000)
        idle.append(client)
        if status != 202:
            raise RuntimeError(f"POST /users answered {status}: {text!r}")

    started = time.perf_counter()
    tasks = []
    try:
        for i in range(requests):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for client in idle:
            await client.close()
    return latencies


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], what: str, procs: Processes, timeout: float = 30.0
) -> None:
    """Poll ``await predicate()`` every 20 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        procs.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def run_scenario(
    scenario: Scenario, requests: int, rate: float, iterations: int, log_dir: Path
) -> Result:
    for queue in (welcome, reports):
        await queue.purge()
    port = free_port()
    procs = Processes(log_dir)
    try:
        procs.start(
            "api",
            [*UVICORN, "--port", str(port)],
            {"WEBAPP_WORKER_IN_API": "1"} if scenario.worker_in_api else None,
        )
        if scenario.worker_processes:
            procs.start(
                "worker",
                [*QFLOW_WORKER, "-p", str(scenario.worker_processes)],
            )
        client = HTTPClient(port)
        try:

            async def api_up() -> bool:
                try:
                    return (await client.request("GET", "/health"))[0] == 200
                except OSError:
                    await client.close()
                    return False

            await wait_until(api_up, "the API to answer", procs)
            # A worker is up once a probe job completes; then every worker process must be running
            # heavy jobs before the clock starts, so no start-up work is measured.
            probe = await send_welcome.add(NewUser(email="probe@example.com", name="Probe"))
            await wait_until(lambda: _done(probe), "a worker to run a probe job", procs)
            if scenario.heavy_job:
                await reports.add_bulk(
                    qflow.JobSpec(scenario.heavy_job, iterations) for _ in range(HEAVY_BACKLOG)
                )
                expected_active = HEAVY_CONCURRENCY * max(1, scenario.worker_processes)

                async def heavy_running() -> bool:
                    return (await reports.counts())["active"] >= expected_active

                await wait_until(heavy_running, "the heavy jobs to be running", procs)
            for i in range(10):  # warm-up, not measured
                await client.request("POST", "/users", {"email": f"warm{i}@example.com", "name": "Warm"})
            done_before = (await reports.stats()).get("completed", 0)
            started = time.perf_counter()
            latencies = await open_loop(port, requests, rate)
            window = time.perf_counter() - started
            heavy_done = (await reports.stats()).get("completed", 0) - done_before
        finally:
            await client.close()
        procs.check_alive()
    finally:
        procs.stop()
    for queue in (welcome, reports):
        await queue.purge()
    return Result(scenario, latencies, heavy_done / window)


async def _done(job: qflow.Job[Any]) -> bool:
    return await job.status() is qflow.State.COMPLETED


def table(rounds: list[list[Result]]) -> str:
    """One row per scenario: the median over rounds of each round's p50, p99 and heavy rate; the worst max."""
    lines = [
        "| where the heavy jobs run | requests | API p50 | API p99 | API max | heavy jobs done |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in zip(*rounds, strict=True):
        scenario = row[0].scenario
        p50 = statistics.median(percentile(r.latencies_ms, 0.5) for r in row)
        p99 = statistics.median(percentile(r.latencies_ms, 0.99) for r in row)
        worst = max(max(r.latencies_ms) for r in row)
        requests = sum(len(r.latencies_ms) for r in row)
        heavy = (
            "—" if scenario.heavy_job is None else f"{statistics.median(r.heavy_per_s for r in row):.1f}/s"
        )
        lines.append(
            f"| {scenario.title} | {requests} | {p50:.1f} ms | {p99:.1f} ms | {worst:.1f} ms | {heavy} |"
        )
    return "\n".join(lines)


async def measure(args: argparse.Namespace, chosen: list[Scenario]) -> list[list[Result]]:
    """Every scenario once per round, rounds one after the other (so a burst of outside load hits one
    round of a few rows, not every round of one row); returns the results round by round."""
    iterations = calibrate(args.heavy_ms)
    with tempfile.TemporaryDirectory(prefix="qflow-measure-") as tmp:
        rounds = []
        async with app:
            for n in range(args.rounds):
                results = []
                for scenario in chosen:
                    print(f"  round {n + 1}/{args.rounds}: heavy jobs {scenario.title}", file=sys.stderr)
                    results.append(
                        await run_scenario(scenario, args.requests, args.rate, iterations, Path(tmp))
                    )
                rounds.append(results)
        return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="measured requests per scenario (300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each row shows their median (3)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests sent per second (100)")
    parser.add_argument("--heavy-ms", type=float, default=50.0, help="CPU time of one heavy job, ms (50)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names or args.requests < 1 or args.heavy_ms <= 0 or args.rate <= 0 or args.rounds < 1:
        parser.error(f"bad --scenarios {unknown or names}, --requests or --heavy-ms")
    print(f"server: {app.resolve_url()}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    results = asyncio.run(measure(args, [SCENARIOS[n] for n in names]))
    load_after = os.getloadavg()[0]
    heavy = any(r.scenario.heavy_job for r in results[0])
    notes = [
        f"{args.rounds} round(s) of {args.requests} `POST /users` per row, sent at {args.rate:g} per second "
        "whether or not earlier ones were answered (after 10 unmeasured ones); p50, p99 and jobs/s are the "
        "median of the rounds, max the worst"
    ]
    if heavy:
        notes.append(f"heavy jobs of {args.heavy_ms:g} ms of pure-Python CPU each, 2 at a time per process")
    notes.append(f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.system()}")
    # Other work on the machine shows up in every column: say how busy it was.
    notes.append(f"1-min load average {load_before:.1f} before, {load_after:.1f} after")
    print("; ".join(notes) + ".\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
