"""One worker process's loop: claim -> run in one of the processor's lanes -> ack; leases; recovery; drain.

``Worker`` wires the parts; each part is a module of this package (one task group per worker):

- ``fetch``: a *fetcher* per queue claims jobs in batches sized by free concurrency, and blocks on the server
  (``BZPOPMIN`` on the queue's marker: one new job wakes one idle fetcher, and one fetcher holds the timer
  of the earliest delayed job) when there is nothing to claim;
- ``lanes``: each processor has ``concurrency`` *lanes*, tasks that run its jobs one after another (sync
  handlers in a thread); jobs claimed ahead wait in line for the next free lane, and a failure that needs no
  handler (undecodable envelope, unknown name) is recorded by a one-off task;
- ``acks``: an *acker* per queue sends the completions that piled up while the previous batch was in flight,
  as one script call; failures and retries are sent by their lane;
- ``leases``: one *renewer* extends every lease this process holds, all queues in one pipelined round trip,
  and cancels handlers whose lease was lost; a *checker* per queue runs the stalled-job recovery (one checker
  acts per interval fleet-wide);
- ``drain``: at a stop, finish in-flight jobs up to the drain timeout, then release the rest.

What they share is ``shared.Shared``; what the worker holds per job and per queue is ``deliveries`` (a
delivery's states and their legal moves, lanes, slots). A job id is never only in this process's memory: the
claim script moves it from ``wait`` into ``active``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .._broker import scripts
from .._broker.keys import FleetKeys
from .._broker.servercheck import check_access, check_server
from .._queue import Queue
from .._settings import MAX_CONCURRENCY, MAX_COUNT, check_number
from ..exceptions import ConfigurationError
from .acks import Acker
from .aio import as_coro, cancel_until_done
from .deliveries import QueueRunner
from .drain import cancel_unfinished, drain
from .fetch import Fetcher
from .lanes import Lanes
from .leases import Leases
from .scheduler import Scheduler, declarations
from .shared import Shared

if TYPE_CHECKING:
    from .._app import App
    from .._settings import WorkerSettings

__all__ = ("Worker",)

log = logging.getLogger("qflow._worker")  # one name for all the worker's parts, as before the split


class Worker:
    """Runs the processors of some queues in this process. Usually started by ``App.run_worker``."""

    def __init__(
        self,
        app: App,
        queues: Iterable[str | Queue] | None = None,
        *,
        concurrency: int | None = None,
        burst: bool = False,
        settings: WorkerSettings | None = None,
        max_jobs: int | None = None,
        companions: Sequence[Callable[[Worker], Awaitable[None]]] = (),
    ) -> None:
        """Select queues and options; no I/O happens until ``run``.

        ``max_jobs``: stop gracefully after handling that many jobs (recycling). ``companions``: extra
        coroutines started beside the worker's own tasks and cancelled when it stops (heartbeats, watchdogs).
        """
        # nan < 1 is false and True is an int: check_number refuses both (issue 12 item 4).
        if max_jobs is not None:
            check_number("max_jobs", max_jobs, ge=1, le=MAX_COUNT, integer=True, unit="or None")
        if concurrency is not None:
            check_number("concurrency", concurrency, ge=1, le=MAX_CONCURRENCY, integer=True, unit="or None")
        self.app = app
        self.settings = settings or app.worker_settings
        self.burst = burst
        self._concurrency = concurrency
        selected: list[Queue] = []
        if queues is None:
            selected = [q for q in app.queues.values() if q.processors]
        else:
            for q in queues:
                name = q.name if isinstance(q, Queue) else q
                if name not in app.queues:
                    raise ConfigurationError(
                        f"no queue named {name!r} in this app (declared: {', '.join(sorted(app.queues))})"
                    )
                selected.append(app.queues[name])
        if not selected:
            raise ConfigurationError("nothing to run: no selected queue has a processor")
        for q in selected:
            if not q.processors:
                raise ConfigurationError(f"queue {q.name!r} has no processors to run")
            for proc in q.processors.values():
                _ = proc.payload_type  # resolve type hints now: a bad annotation fails at start
        self.queues = selected
        self.id = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.max_jobs = max_jobs
        self.companions = tuple(companions)
        self.ready = asyncio.Event()
        """Set once the worker is fetching."""
        self.server_warnings: list[str] = []
        """Settings of the server that weaken a guarantee (AOF off, an evicting policy), found at start."""
        self._shared = shared = Shared(
            app, self.settings, worker_id=self.id, burst=burst, max_jobs=max_jobs, request_stop=self.stop
        )
        self._acker = Acker(shared)
        self._lanes = Lanes(shared, self._acker)
        self._fetcher = Fetcher(shared, self._lanes)
        self._leases = Leases(shared)
        # Repeatable jobs (issue 14): each worker process fires the schedules of its queues; a bad
        # @queue.cron declaration fails the start here. A burst worker drains and exits: it fires nothing.
        self.scheduler = None if burst else Scheduler(shared, selected, declarations(selected))

    # -- counters ----------------------------------------------------------------------------------------

    @property
    def jobs_done(self) -> int:
        """Jobs this worker completed."""
        return self._shared.jobs_done

    @property
    def jobs_failed(self) -> int:
        """Jobs this worker recorded as failed for good (handler errors, bad payloads, unknown names)."""
        return self._shared.jobs_failed

    @property
    def jobs_retried(self) -> int:
        """Failed attempts this worker scheduled for a retry."""
        return self._shared.jobs_retried

    @property
    def jobs_handled(self) -> int:
        """Jobs this worker finished in any way (completed, failed, retried)."""
        return self._shared.jobs_handled

    @property
    def stale_acks(self) -> int:
        """Outcomes Redis refused because the job's lease had expired and the job was recovered."""
        return self._shared.stale_acks

    # -- control -----------------------------------------------------------------------------------------

    def stop(self, *, fast: bool = False) -> None:
        """Ask the worker to stop: finish in-flight jobs up to the drain timeout (``fast``: release now)."""
        shared = self._shared
        shared.fast = shared.fast or fast
        if shared.stop is not None:
            shared.begin_stop()
            self._fetcher.unpark()
            if fast:
                # Also mid-drain (issue #3: a supervisor's second signal): cancel handlers now, as the second
                # SIGTERM in _on_signal does; the drain then releases their jobs.
                cancel_unfinished(shared)

    @property
    def in_flight(self) -> int:
        """Jobs this worker holds right now."""
        return self._shared.in_flight()

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Queue name -> (jobs whose handler runs now, jobs claimed ahead that wait for a lane).

        The first is bounded by the processors' concurrency; ``in_flight`` also counts acks on their way.
        """
        return {r.queue.name: (r.running(), r.queued()) for r in self._shared.runners}

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._shared.stopping

    def job_of_task(self, task: asyncio.Task[Any]) -> tuple[str, str] | None:
        """``(queue:processor, job id)`` of the job a task runs now, or None (for loop-blocking warnings)."""
        for r in self._shared.runners:
            for d in r.in_flight.values():
                if d.task is task:
                    return f"{r.queue.name}:{d.env.name if d.env is not None else '?'}", d.id
        return None

    async def renew_leases(self) -> None:
        """Extend every lease this process holds: one pipelined round trip for all queues."""
        await self._leases.renew()

    async def check_stalled(self, queue: Queue) -> list[str]:
        """Run the stalled-job recovery for ``queue`` once; returns the ids it recovered or failed."""
        return await self._leases.check_stalled(queue)

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run until ``stop()`` (or, in burst mode, until the queues are drained), then drain and return."""
        shared = self._shared
        shared.begin()
        window = self.settings.prefetch_window
        gate = self._lanes.gate
        gate.open()  # nothing held from an earlier run
        gate.busy = 0
        shared.runners = runners = [QueueRunner(q, self._concurrency, window, gate) for q in self.queues]
        client = shared.redis()
        self.server_warnings = await check_server(client)
        # Before the worker reports ready: an ACL user who may not touch the queues' keys is refused now
        # (BrokerAuthError; exit CONFIG under the CLI), not by its first claim.
        groups = {f"queue {r.queue.name!r}": r.keys.all_fixed() for r in runners}
        groups["the fleet registry"] = (FleetKeys(self.app.prefix).workers,)
        await check_access(client, groups)
        await scripts.load_all(client)
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        log.info(
            "worker %s started: queues %s",
            self.id,
            ", ".join(f"{r.queue.name}(c={r.slots.concurrency})" for r in runners),
        )
        background: list[asyncio.Task[None]] = []
        try:
            background.append(asyncio.create_task(self._leases.renew_loop(), name="qflow-renew"))
            if self.scheduler is not None:
                background.append(asyncio.create_task(self.scheduler.run(), name="qflow-scheduler"))
            background += [
                asyncio.create_task(as_coro(companion(self)), name=f"qflow-companion-{i}")
                for i, companion in enumerate(self.companions)
            ]
            background += [
                asyncio.create_task(self._leases.check_loop(r), name=f"qflow-check-{r.queue.name}")
                for r in runners
            ]
            background += [
                asyncio.create_task(self._acker.run(r), name=f"qflow-ack-{r.queue.name}") for r in runners
            ]
            fetchers = [
                asyncio.create_task(self._fetcher.run(r), name=f"qflow-fetch-{r.queue.name}") for r in runners
            ]
            self.ready.set()
            try:
                await asyncio.gather(*fetchers)
            finally:
                await cancel_until_done(fetchers)
            await drain(shared)
        finally:
            await cancel_until_done(background)
            self._acker.close(runners)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            log.info(
                "worker %s stopped: %d jobs handled (%d completed, %d failed, %d retried)",
                self.id,
                shared.jobs_handled,
                shared.jobs_done,
                shared.jobs_failed,
                shared.jobs_retried,
            )

    def _on_signal(self, sig: signal.Signals) -> None:
        shared = self._shared
        if shared.stopping:
            log.warning("second %s: stopping now, releasing unfinished jobs", sig.name)
            shared.fast = True
            shared.begin_stop()
            self._fetcher.unpark()
            cancel_unfinished(shared)
        else:
            log.info(
                "%s: draining (up to %.0fs); send again to stop now",
                sig.name,
                self.settings.drain_timeout,
            )
            self.stop()
