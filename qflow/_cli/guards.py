"""A worker process's self-checks: the memory guard (``--max-memory-per-child``) and the loop watchdog.

Both run as ``Worker`` companions on the worker's event loop. The memory guard drains the worker to be
replaced once its resident memory passes the limit; the watchdog, a thread, names the ``async`` processor
that holds the event loop (then nothing else runs: no other job, lease renewal or heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._worker.worker import Worker

__all__ = ("loop_watchdog", "memory_guard", "rss_bytes")

log = logging.getLogger("qflow.worker")  # the same logger as the rest of the worker process (child.py)


# -- memory ------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident memory of this process in bytes (``/proc/self/statm``; peak RSS where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_guard(limit_mb: float) -> Callable[[Worker], Awaitable[None]]:
    """Drain and exit (to be replaced) once RSS passes ``limit_mb``; checked every second."""

    async def run(worker: Worker) -> None:
        limit = limit_mb * 1024 * 1024
        await asyncio.sleep(random.uniform(0.0, 1.0))  # jitter: children do not all check at once
        while not worker.stopping:
            rss = rss_bytes()
            if rss > limit:
                log.warning(
                    "memory %.0f MB is over --max-memory-per-child %.0f MB: draining to be replaced",
                    rss / 2**20,
                    limit_mb,
                )
                worker.stop()
                return
            await asyncio.sleep(1.0)

    return run


# -- loop watchdog -----------------------------------------------------------------------------------------


def loop_watchdog(threshold: float) -> Callable[[Worker], Awaitable[None]]:
    """Warn, naming the processor, when one task holds the event loop longer than ``threshold`` seconds."""

    async def run(worker: Worker) -> None:
        dog = _Watchdog(asyncio.get_running_loop(), worker, threshold)
        dog.start()
        try:
            await asyncio.Event().wait()
        finally:
            dog.halt()

    return run


class _Watchdog(threading.Thread):
    """A thread that probes the loop: while a probe stays unanswered, a task that stays current for
    ``threshold`` seconds is blocking the loop. Warns at once (the loop may never recover: the supervisor
    then kills it), at most once a minute per culprit."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: Worker, threshold: float) -> None:
        super().__init__(name="qflow-loop-watchdog", daemon=True)
        self.loop = loop
        self.worker = worker
        self.threshold = threshold
        self._halt = threading.Event()
        self._answered = threading.Event()
        self._last_warned: dict[str, float] = {}

    def halt(self) -> None:
        """Stop the thread (it exits within one probe period)."""
        self._halt.set()

    def run(self) -> None:
        """Probe the loop; while a probe is unanswered, watch which task is current."""
        period = max(0.005, self.threshold / 4)
        while not self._halt.is_set():
            self._answered.clear()
            try:
                self.loop.call_soon_threadsafe(self._answered.set)
            except RuntimeError:
                return  # the loop closed
            suspect = asyncio.current_task(self.loop)
            since = time.monotonic()
            reported = False
            while not self._answered.wait(period):
                if self._halt.is_set():
                    return
                current = asyncio.current_task(self.loop)
                now = time.monotonic()
                if current is not suspect:
                    suspect, since = current, now
                elif current is not None and not reported and now - since >= self.threshold:
                    self._report(current, now - since)
                    reported = True
            self._halt.wait(period)

    def _report(self, task: asyncio.Task[object], seconds: float) -> None:
        try:
            found = self.worker.job_of_task(task)
        except RuntimeError:  # the loop thread changed a dict while we read it
            found = None
        if found is None:
            # Not a job: more likely starved of the GIL by sync handlers' threads than blocking.
            log.debug("task %s has held the event loop for %.2fs", task.get_name(), seconds)
            return
        processor, job = found
        culprit = processor
        now = time.monotonic()
        if now - self._last_warned.get(culprit, -1e9) < 60.0:
            return
        self._last_warned[culprit] = now
        log.warning(
            "async processor %s (job %s) is blocking the event loop (%.2fs so far): no other job, "
            "lease renewal or heartbeat runs meanwhile. Make it `def` (it then runs in a thread) or give "
            "it its own processes (`qflow worker ... -q %s -p N`)",
            processor,
            job,
            seconds,
            processor.split(":", 1)[0],
        )
