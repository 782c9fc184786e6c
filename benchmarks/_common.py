"""Plumbing for benchmarks/run.py: adapter processes, server counters, per-system virtual environments.

Nothing here knows a workload: ``Proc`` runs one adapter (``benchmarks/peers/<name>.py``) and speaks its
JSON-lines protocol (see ``benchmarks/peers/_protocol.py``), ``Server`` reads ``INFO`` counters and deletes a
run's keys, ``ensure_venv`` installs a system into its own virtual environment under the cache directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import redis

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / "benchmarks" / "peers"
CACHE = Path(os.environ.get("QFLOW_BENCH_CACHE", Path.home() / ".cache" / "qflow-bench"))


def log(msg: str) -> None:
    """Progress goes to stderr, so ``--json`` keeps stdout machine-readable."""
    print(msg, file=sys.stderr, flush=True)


class AdapterError(RuntimeError):
    """An adapter process failed, said something unexpected, or ran out of time."""


class Proc:
    """One adapter process: its stdout lines parsed as JSON by a reader thread; stderr kept in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], label: str) -> None:
        self.label = label
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (closed in _close)
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=tempfile.gettempdir(),  # never the repository: no stray module shadows a system's package
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.progress: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.ready = threading.Event()
        self._done = threading.Event()
        threading.Thread(target=self._read, daemon=True, name=f"read-{label}").start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue  # a library's banner or print: not ours
            if not isinstance(obj, dict):
                continue
            event = obj.get("event")
            if event == "ready":
                self.ready.set()
            elif event == "final":
                self.final = obj
            elif "done" in obj:
                self.progress = obj
            else:
                self.lines.put(obj)
        self._done.set()

    def stderr_tail(self, size: int = 1500) -> str:
        self._err.seek(0)
        text = self._err.read().decode(errors="replace")
        return text[-size:].strip()

    def fail(self, what: str) -> AdapterError:
        code = self.p.poll()
        status = f"exit {code}" if code is not None else "still running"
        return AdapterError(f"{self.label}: {what} ({status}); stderr: {self.stderr_tail() or '-'}")

    def send(self, line: str) -> None:
        try:
            assert self.p.stdin is not None
            self.p.stdin.write((line + "\n").encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise self.fail("did not get ready")

    def result(self, timeout: float) -> dict[str, Any]:
        """The one result line of an ``enqueue`` command."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                obj = self.lines.get(timeout=0.05)
                break
            except queue.Empty:
                if self.p.poll() is not None and self._done.is_set() and self.lines.empty():
                    raise self.fail("exited without a result") from None
                if time.monotonic() > deadline:
                    raise self.fail(f"no result within {timeout:.0f}s") from None
        if self.p.wait(timeout=30) != 0:
            raise self.fail("exited with an error")
        return obj

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Ask for the final report; kill the process if it does not exit in time. Always reaps it."""
        if self.alive():
            self.send("stop")
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._done.wait(5)
        self._close()
        return self.final

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
            self.p.wait()
        self._close()

    def _close(self) -> None:
        for stream in (self.p.stdin, self.p.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._err.close()


class Server:
    """A Redis server's counters (INFO cpu / commandstats / memory) and key clean-up."""

    def __init__(self, url: str, *, owned: bool) -> None:
        self.url = url
        self.owned = owned  # started by run.py: FLUSHALL between workloads is ours to do
        self.client = redis.Redis.from_url(url, socket_timeout=30)

    def version(self) -> str:
        info = self.client.info("server")
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"redis {info['redis_version']}"

    def snapshot(self) -> dict[str, Any]:
        cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")
        mem = self.client.info("memory")
        return {
            "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "calls": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
            "mem": int(mem["used_memory"]),
        }

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any], jobs: int) -> dict[str, Any]:
        """Per-job server cost between two snapshots (INFO's own calls left out)."""
        calls = {
            name: b["calls"][name] - a["calls"].get(name, 0)
            for name in b["calls"]
            if name != "info" and b["calls"][name] - a["calls"].get(name, 0) > 0
        }
        per_job = {name: n / jobs for name, n in sorted(calls.items(), key=lambda kv: -kv[1])}
        return {
            "server_cpu_us": (b["cpu"] - a["cpu"]) * 1e6 / jobs,
            "cmds_per_job": sum(calls.values()) / jobs,
            "cmds": {name: round(v, 3) for name, v in per_job.items() if v >= 0.005},
        }

    def clean(self, patterns: list[str]) -> None:
        if self.owned:
            self.client.flushall()
            return
        for pattern in patterns:
            batch = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    self.client.delete(*batch)
                    batch.clear()
            if batch:
                self.client.delete(*batch)

    def close(self) -> None:
        self.client.close()


# -- virtual environments --------------------------------------------------------------------------------


def venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def ensure_venv(name: str, requirements: list[str], *, link_current: bool = False) -> Path:
    """A virtual environment under the cache dir with ``requirements`` installed; returns its python.

    ``link_current``: also see this interpreter's site-packages (for qflow itself, installed editable in the
    project's venv), behind the venv's own packages, so e.g. hiredis can be added without touching the
    project's venv. Reuses an environment whose marker file lists the same requirements.
    """
    path = CACHE / "venvs" / name
    marker = path / ".qflow-bench-requirements"
    wanted = "\n".join([*requirements, f"link={link_current}", f"python={platform.python_version()}"])
    if marker.exists() and marker.read_text() == wanted and venv_python(path).exists():
        return venv_python(path)
    log(f"  installing {name} into {path} ({' '.join(requirements)}) ...")
    if path.exists():
        shutil.rmtree(path)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True, timeout=300, capture_output=True)
    if link_current:
        purelib = sysconfig.get_paths()["purelib"]
        own = subprocess.run(
            [str(venv_python(path)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # addsitedir also runs that dir's .pth files (qflow's editable install is one).
        Path(own, "zz_qflow_bench_parent.pth").write_text(f"import site; site.addsitedir({purelib!r})\n")
    proc = subprocess.run(
        [str(venv_python(path)), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise AdapterError(f"pip install {' '.join(requirements)} failed: {proc.stderr.strip()[-1500:]}")
    marker.write_text(wanted)
    return venv_python(path)


# -- machine and numbers ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "platform": platform.platform(),
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an unsorted list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
