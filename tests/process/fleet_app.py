"""The app the supervisor tests run as ``qflow worker tests.process.fleet_app:app``.

Configured by environment variables, read when the module is imported (each worker process imports it):

- ``FLEET_REDIS_URL``, ``FLEET_PREFIX``: where the queues live;
- ``FLEET_LEDGER``: a directory where every process appends what it runs to ``<pid>.log``, one
  ``os.write`` per line on an ``O_APPEND`` descriptor, so a SIGKILL loses no line that was written.

Ledger lines: ``start <job id> <attempt> <stalls>`` and ``end <job id>``, in the file of the process that ran
them. Tests build their own producer-side app with ``build(url, prefix)``.

The second half is the test side: ``Fleet`` starts ``python -m qflow worker`` supervisors (each in its own
session) and ``python -m qflow`` commands with that environment, polls with deadlines, and in ``cleanup``
SIGKILLs every supervisor's process group and reaps every worker process it saw (the test process is made a
child subreaper, so the workers of a SIGKILLed supervisor are reaped here, not left as zombies).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import qflow

SETTINGS = qflow.WorkerSettings(
    lease_ttl=1.0, check_interval=0.25, max_stalls=10, drain_timeout=5.0, block_timeout=0.5
)
QUEUE = "work"

_hoard: list[bytes] = []  # memory the `hog` processor keeps, so the process grows


def _record(line: str) -> None:
    directory = os.environ.get("FLEET_LEDGER")
    if not directory:
        return
    fd = os.open(Path(directory) / f"{os.getpid()}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def build(url: str | None, prefix: str) -> qflow.App:
    """The app with its processors, on ``url`` under ``prefix``."""
    app = qflow.App(
        url,
        prefix=prefix,
        worker=SETTINGS,
        retention=qflow.RetentionSettings(completed_count=100_000, failed_count=100_000),
    )
    work = app.queue(QUEUE)
    other = app.queue("other")

    @work.processor(concurrency=4)
    async def sleep(job: qflow.Job[float]) -> int:
        """Sleep ``payload`` seconds on the event loop (I/O-bound)."""
        _record(f"start {job.id} {job.attempt} {job.stalls}")
        await asyncio.sleep(job.payload)
        _record(f"end {job.id}")
        return os.getpid()

    @work.processor(concurrency=2)
    def cpu(job: qflow.Job[float]) -> int:
        """Burn CPU in pure Python for ``payload`` seconds (a sync processor: it runs in a thread)."""
        _record(f"start {job.id} {job.attempt} {job.stalls}")
        deadline = time.monotonic() + job.payload
        n = 0
        while time.monotonic() < deadline:
            n += sum(i * i for i in range(1000))
        _record(f"end {job.id}")
        return os.getpid()

    @work.processor
    async def block(job: qflow.Job[float]) -> int:
        """Block the event loop for ``payload`` seconds on the first delivery (the bug the watchdog names)."""
        _record(f"start {job.id} {job.attempt} {job.stalls}")
        if job.stalls == 0:
            time.sleep(job.payload)  # noqa: ASYNC251  # deliberately blocking: that is the test
        _record(f"end {job.id}")
        return os.getpid()

    @work.processor
    async def hog(job: qflow.Job[int]) -> int:
        """Keep ``payload`` MB more of memory in this process (1 MB at a time, yielding to the loop)."""
        _record(f"start {job.id} {job.attempt} {job.stalls}")
        for _ in range(job.payload):
            _hoard.append(os.urandom(2**20))
            await asyncio.sleep(0)
        _record(f"end {job.id}")
        return os.getpid()

    @work.processor
    async def boom(job: qflow.Job[str]) -> None:
        """Always fail, with ``payload`` as the message."""
        raise ValueError(job.payload)

    @other.processor
    async def noop(job: qflow.Job[None]) -> None:
        """Do nothing."""

    return app


def _sabotage() -> None:
    """Fail at import as a test asks: ``FLEET_BREAK`` names a file whose presence means "bad deploy"
    (the import raises), ``FLEET_CRASH`` one whose presence means "crash at once" (exit 1)."""
    broken = os.environ.get("FLEET_BREAK")
    if broken and Path(broken).exists():
        raise RuntimeError("this deploy is broken")
    crash = os.environ.get("FLEET_CRASH")
    if crash and Path(crash).exists():
        os._exit(1)


_sabotage()
app = build(os.environ.get("FLEET_REDIS_URL"), os.environ.get("FLEET_PREFIX", "qflow"))


@dataclass
class Ledger:
    """What every process recorded: runs per job id, and which pid ran what."""

    starts: dict[str, list[int]] = field(default_factory=dict)
    """job id -> pids that started it, in order."""
    ends: dict[str, list[int]] = field(default_factory=dict)
    """job id -> pids that finished it."""

    def pids(self) -> set[int]:
        """Every pid that started a job."""
        return {pid for pids in self.starts.values() for pid in pids}


def read_ledger(directory: Path) -> Ledger:
    """Merge every process's ledger file."""
    led = Ledger()
    for path in directory.glob("*.log"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue  # a line being written right now
            target = led.starts if parts[0] == "start" else led.ends
            target.setdefault(parts[1], []).append(pid)
    return led


# -- the test side: running `qflow worker` and `qflow ...` as real subprocesses ----------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.process.fleet_app:app"
_PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    """Adopt orphans (the children of a SIGKILLed supervisor) so this process can reap them (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone; if it is our child, it is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Supervised:
    """One ``qflow worker`` supervisor subprocess (in its own session: its group is its children too)."""

    def __init__(self, fleet: Fleet, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.fleet = fleet
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path

    def log(self) -> str:
        """Everything the supervisor and its children logged so far."""
        return self.log_path.read_text(errors="replace")

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the supervisor only."""
        self.popen.send_signal(sig)

    def status(self) -> dict[str, Any]:
        """The supervisor's own view, through its control socket (empty if it is not listening yet)."""
        from qflow._cli.control import control_request

        path = self.fleet.run_dir / f"qflow-{self.pid}.sock"
        try:
            reply = control_request(path, {"cmd": "status"}, timeout=2.0)
        except (OSError, ValueError):
            return {"children": []}
        self.fleet.seen.update(c["pid"] for c in reply["children"])
        return reply

    def ready_pids(self) -> set[int]:
        """Pids of children that are ready and not draining."""
        return {c["pid"] for c in self.status()["children"] if c["ready"] and c["state"] == "active"}

    def child_pids(self) -> set[int]:
        """Pids of every child, whatever its state."""
        return {c["pid"] for c in self.status()["children"]}

    async def wait_ready(self, n: int, *, timeout: float = 20.0, exact: bool = True) -> set[int]:
        """Poll until ``n`` children are ready (and, with ``exact``, no other child exists)."""

        def check() -> bool:
            st = self.status()
            ready = {c["pid"] for c in st["children"] if c["ready"] and c["state"] == "active"}
            return len(ready) == n and (not exact or len(st["children"]) == n)

        await self.fleet.until(check, timeout=timeout, what=f"{n} ready children", sup=self)
        return self.ready_pids()

    async def wait_exit(self, timeout: float) -> int:
        """Poll until the supervisor exits; return its code."""
        await self.fleet.until(lambda: self.popen.poll() is not None, timeout=timeout, what="exit", sup=self)
        code = self.popen.returncode
        assert code is not None
        return code


class Fleet:
    """Starts supervisors and CLI commands against one Redis prefix; kills and reaps everything after."""

    def __init__(self, redis_url: str, prefix: str, tmp: Path) -> None:
        self.tmp = tmp
        self.ledger_dir = tmp / "ledger"
        self.ledger_dir.mkdir()
        # AF_UNIX paths are short (108 bytes): pytest's tmp_path can be too long for the control socket.
        self.run_dir = Path(tempfile.mkdtemp(prefix="qf-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("QFLOW_")}
        env.update(
            FLEET_REDIS_URL=redis_url,
            FLEET_PREFIX=prefix,
            FLEET_LEDGER=str(self.ledger_dir),
            QFLOW_RUN_DIR=str(self.run_dir),
            QFLOW_EMBEDDED="0",
        )
        self.env = env
        self.supervisors: list[Supervised] = []
        self.seen: set[int] = set()
        _subreaper(True)

    def start(self, *args: str, target: str = TARGET) -> Supervised:
        """Start ``python -m qflow worker <target> *args`` from the repo root."""
        log_path = self.tmp / f"supervisor-{len(self.supervisors)}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "qflow", "worker", target, *args],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sup = Supervised(self, popen, log_path)
        self.supervisors.append(sup)
        return sup

    def cli(
        self, *args: str, timeout: float = 30.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m qflow *args`` to completion (no stdin, like CI) and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "qflow", *args],
            cwd=REPO_ROOT,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ledger(self) -> Ledger:
        """The merged ledger of every worker process."""
        return read_ledger(self.ledger_dir)

    async def until(
        self, predicate: Callable[[], bool], *, timeout: float, what: str, sup: Supervised | None = None
    ) -> float:
        """Poll ``predicate`` every 20 ms until it holds; return when (monotonic), or fail with the logs."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                logs = "\n".join(s.log() for s in ([sup] if sup else self.supervisors))
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
            await asyncio.sleep(0.02)
        return time.monotonic()

    def cleanup(self) -> None:
        """SIGKILL every supervisor's process group and reap every process seen."""
        for sup in self.supervisors:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(sup.pid, signal.SIGKILL)
            sup.popen.wait(timeout=10)
        deadline = time.monotonic() + 10
        for pid in self.seen:
            while alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)
        _subreaper(False)
        for path in self.run_dir.glob("*"):
            path.unlink()
        self.run_dir.rmdir()
