"""The JSON-lines protocol between ``benchmarks/run.py`` and one adapter process (stdlib only).

Every adapter (``benchmarks/peers/<name>.py``) runs under its own system's virtual environment, so it
imports neither qflow (except ``qflow.py`` itself) nor anything from ``benchmarks/``: only this file, which
sits beside it. run.py starts adapters with ``python -P`` so that ``arq.py`` does not shadow the ``arq``
package; the adapter then appends its own folder to ``sys.path`` to find this module.

Commands (``python -P <adapter> COMMAND --url URL --ns NAMESPACE ...``):

- ``info``: one line ``{"name", "version", "guarantee", "settings", "bulk", "concurrent", "keys", "parser"}``.
  ``keys`` are the SCAN patterns (``{ns}`` filled in) run.py deletes after each workload on a shared server.
- ``enqueue --mode one|bulk|concurrent|paced --n N [--rate R] [--sleep S]``: add N jobs, one awaited add at
  a time / through the bulk API / as many concurrent adds / one at a time paced at R per second. Prints
  ``{"event": "ready"}``, waits for ``go`` on stdin, adds, prints ``{"n", "seconds", "cpu"}`` (the adding
  alone is timed; CPU seconds of this process while adding) and exits.
- ``worker --concurrency C [--latency]``: build the worker, print ``{"event": "ready"}``, wait for ``go`` on
  stdin, run. While running, print ``{"done", "first", "last", "cpu", "cpu0", "rss"}`` every 50 ms. On
  ``stop`` (or stdin closing: run.py died) print ``{"event": "final", ..., "latencies": [...]}`` and exit at
  once with ``os._exit`` (the queue's keys are deleted by run.py; nothing needs a graceful stop).

Every job's payload is ``(enqueue time in ns from time.time_ns(), seconds to sleep)``. A handler calls
``tally.begin(ts)`` first and ``tally.end()`` last; ``first`` is the wall time of the first ``begin``,
``last`` of the latest ``end``, so start-up of the process is never counted. ``cpu0`` is this process's CPU
time (``time.process_time()``: user + system, all threads) at the first ``begin``, ``cpu`` the same now.
"""

from __future__ import annotations

import argparse
import importlib.abc
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ("Tally", "WorkerSession", "configure", "cpu_seconds", "emit", "parse_args", "rss_kib")

_emit_lock = threading.Lock()


class _BlockHiredis(importlib.abc.MetaPathFinder):
    """Makes ``import hiredis`` fail, so redis-py falls back to its pure-Python parser (``--no-hiredis``)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "hiredis" or fullname.startswith("hiredis."):
            raise ImportError("hiredis disabled by QFLOW_BENCH_NO_HIREDIS=1")


def configure() -> None:
    """Apply run.py's switches; call before importing redis or the system under test."""
    if os.environ.get("QFLOW_BENCH_NO_HIREDIS") == "1":
        sys.meta_path.insert(0, _BlockHiredis())


def uvloop_wanted() -> bool:
    return os.environ.get("QFLOW_BENCH_UVLOOP") == "1"


def run_async(main: Callable[[], Any]) -> Any:
    """``asyncio.run(main())``, on uvloop when run.py asked for it (``--uvloop``)."""
    import asyncio

    if uvloop_wanted():
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def redis_parser() -> str:
    """Which reply parser redis-py uses in this process (hiredis is a C extension; else pure Python)."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return "n/a"
    return "hiredis" if HIREDIS_AVAILABLE else "python"


def emit(obj: dict[str, Any]) -> None:
    with _emit_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system (ns resolution; os.times() ticks at 10 ms)."""
    return time.process_time()


def rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["info", "enqueue", "worker"])
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--ns", default="bench")
    p.add_argument("--mode", choices=["one", "bulk", "concurrent", "paced"], default="one")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--retain", type=int, default=0, help="finished jobs to keep (0: the system's default)")
    return p.parse_args(argv)


def main(
    info: Callable[[argparse.Namespace], None],
    enqueue: Callable[[argparse.Namespace], Any],
    worker: Callable[[argparse.Namespace], None],
) -> None:
    """An adapter's entry point: parse the command line, configure, run ``info``, ``enqueue`` or ``worker``.

    ``enqueue`` may be a coroutine function (run on the event loop run.py asked for) or a plain one.
    """
    args = parse_args()
    configure()
    if args.command == "info":
        info(args)
    elif args.command == "enqueue":
        if inspect.iscoroutinefunction(enqueue):
            run_async(lambda: enqueue(args))
        else:
            enqueue(args)
    else:
        worker(args)


def paced(n: int, rate: float) -> list[float]:
    """Offsets (seconds from the start) at which the i-th paced add is due."""
    return [i / rate for i in range(n)]


def _ready_go() -> None:
    """Say ready and block until run.py says go (it reads the server's counters in between)."""
    emit({"event": "ready"})
    for line in sys.stdin:
        if line.strip() == "go":
            return
    os._exit(1)  # run.py went away


def timed(fn: Callable[[], Any], n: int) -> None:
    """Run a synchronous enqueue loop after run.py's go, and print its result line."""
    _ready_go()
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    emit({"n": n, "seconds": seconds, "cpu": cpu_seconds() - c0})


async def timed_async(fn: Callable[[], Any], n: int) -> None:
    """Run an async enqueue loop after run.py's go, and print its result line."""
    import asyncio

    await asyncio.get_running_loop().run_in_executor(None, _ready_go)
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    await fn()
    seconds = time.perf_counter() - t0
    emit({"n": n, "seconds": seconds, "cpu": cpu_seconds() - c0})


class Tally:
    """Counts handler runs from any thread; records pickup latencies when asked."""

    def __init__(self, latency: bool) -> None:
        self._lock = threading.Lock()
        self.latency = latency
        self.done = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu0 = 0.0
        self.latencies: list[int] = []

    def begin(self, ts: int) -> None:
        now = time.time_ns()
        if self.latency:
            self.latencies.append(now - ts)  # list.append is atomic under the GIL
        if not self.first:
            with self._lock:
                if not self.first:
                    self.cpu0 = cpu_seconds()
                    self.first = now / 1e9

    def end(self) -> None:
        now = time.time()
        with self._lock:
            self.done += 1
            self.last = now


class WorkerSession:
    """The worker side of the protocol: ready / go / progress / stop."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.go = threading.Event()
        threading.Thread(target=self._read_stdin, daemon=True, name="bench-stdin").start()

    def _read_stdin(self) -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "go":
                self.go.set()
            elif cmd == "stop":
                break
        self._final()

    def _state(self) -> dict[str, Any]:
        t = self.tally
        return {
            "done": t.done,
            "first": t.first,
            "last": t.last,
            "cpu0": t.cpu0,
            "cpu": cpu_seconds(),
            "rss": rss_kib(),
        }

    def _final(self) -> None:
        try:
            state = self._state()
            state["event"] = "final"
            state["latencies"] = self.tally.latencies
            emit(state)
        finally:
            os._exit(0)  # also when stdout is gone (run.py died): never outlive it

    def _report(self) -> None:
        while True:
            time.sleep(0.05)
            emit(self._state())

    def ready_then_wait(self) -> None:
        """Say ready, block until run.py says go, then start reporting progress."""
        emit({"event": "ready", "rss": rss_kib()})
        self.go.wait()
        threading.Thread(target=self._report, daemon=True, name="bench-report").start()
