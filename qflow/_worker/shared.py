"""What the worker's parts share: configuration, the worker's own Redis client, the per-queue runners, the
stop signal, the counters.

``Worker`` builds one ``Shared`` and hands it to each part (fetch, lanes, acks, leases, drain). A part keeps
its own state to itself; what two parts both read or write lives here, so each part reads alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .._app import App
    from .._settings import WorkerSettings
    from .deliveries import Delivery, QueueRunner

__all__ = ("Shared",)

log = logging.getLogger("qflow._worker")  # one name for all the worker's parts, as before the split


class Shared:
    """The state the worker's parts share (one per ``Worker``)."""

    __slots__ = (
        "app", "burst", "fast", "id", "jobs_done", "jobs_failed", "jobs_handled", "jobs_retried", "max_jobs",
        "request_stop", "runners", "settings", "stale_acks", "stop", "stopping",
    )  # fmt: skip

    def __init__(
        self,
        app: App,
        settings: WorkerSettings,
        *,
        worker_id: str,
        burst: bool,
        max_jobs: int | None,
        request_stop: Callable[[], None],
    ) -> None:
        self.app = app
        self.settings = settings
        self.id = worker_id
        self.burst = burst
        self.max_jobs = max_jobs
        self.request_stop = request_stop
        """``Worker.stop``: a graceful stop, asked for when ``max_jobs`` jobs were handled."""
        self.runners: list[QueueRunner] = []
        """One per selected queue, made by ``Worker.run``."""
        self.stop: asyncio.Event | None = None
        """Set to stop fetching; made by ``Worker.run`` (a stop asked before the worker runs is not kept)."""
        self.stopping = False
        """True once ``stop`` is set: a plain attribute for the hot path (each job reads it; a property
        around ``Event.is_set()`` costs two Python calls)."""
        self.fast = False
        """Release unfinished jobs at once instead of letting them finish (a fast stop, a second signal)."""
        self.jobs_done = 0
        self.jobs_failed = 0
        self.jobs_retried = 0
        self.jobs_handled = 0
        self.stale_acks = 0

    def redis(self) -> aioredis.Redis:
        """The worker's own Redis client (claims, acks, lease renewals, recovery), in the running loop.

        Never the one handlers use: their adds and result waits go through ``app.redis()`` and the result
        waits' pool, so however many connections user code holds, renewals and acks still get theirs
        (DESIGN.md; issue 12 item 2). Call it where a part starts, or per call off the hot path.
        """
        return self.app._worker_redis()

    def begin(self) -> None:
        """A fresh stop event for a run of the worker."""
        self.stop = asyncio.Event()
        self.stopping = False

    def begin_stop(self) -> None:
        """Stop fetching, if the worker runs (before ``begin`` there is nothing to stop)."""
        if self.stop is not None:
            self.stopping = True
            self.stop.set()

    def in_flight(self) -> int:
        """Jobs this worker holds right now."""
        return sum(len(r.in_flight) for r in self.runners)

    def job_budget(self) -> int:
        """With ``max_jobs``: jobs this worker may still claim (those it holds count as handled soon)."""
        assert self.max_jobs is not None
        return self.max_jobs - self.jobs_handled - self.in_flight()

    def finish(self, r: QueueRunner, d: Delivery, handled: bool) -> None:
        """A delivery is done here: count it, free its slot, forget it (released ones wait for the drain)."""
        if handled:
            self.jobs_handled += 1
            if self.max_jobs is not None and self.jobs_handled >= self.max_jobs and not self.stopping:
                log.info("handled %d jobs (max_jobs): stopping to be recycled", self.jobs_handled)
                self.request_stop()
        r.finish(d)
