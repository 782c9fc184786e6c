"""What a worker holds for each queue and each claimed job: slots, lanes, deliveries.

``_worker.py`` runs the loop; this module holds its per-queue and per-job state.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .aio import wait_first

if TYPE_CHECKING:
    from .._broker.scripts import Claimed
    from .._codec import Envelope
    from .._queue import Queue

__all__ = ("Delivery", "Lanes", "QueueRunner", "Slots")


class Lanes:
    """The lanes of one processor in one worker: at most ``limit`` tasks, each running jobs one after another.

    ``limit`` is the processor's concurrency. A claimed job goes to a new lane while fewer than ``limit``
    run, else it waits in ``ready`` (claimed ahead, leased) for the next lane to finish its job.
    """

    __slots__ = ("limit", "ready", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.ready: deque[Delivery] = deque()


class Slots:
    """The claim budget of one queue in one worker.

    ``held`` counts claimed jobs whose handler has not finished. The fetcher may hold up to ``concurrency``
    jobs plus ``ahead`` claimed ahead of time, so the next job is already here when a handler finishes
    (each processor's lanes still bound what runs). ``ahead`` follows the handlers' average run time: a
    job claimed ahead should start within ``window`` seconds, so long jobs get no claim-ahead at all and
    never sit behind one another in this process while another worker is idle. A slot comes back when the
    handler finishes, before its ack's round trip.
    """

    def __init__(self, concurrency: int, window: float) -> None:
        self.concurrency = concurrency
        self.window = window
        self.held = 0
        self.average: float | None = None
        """Moving average of handler run time, seconds (None until a handler has finished)."""
        self._event = asyncio.Event()
        self._event.set()

    @property
    def ahead(self) -> int:
        """Jobs this queue may claim beyond its concurrency right now."""
        avg = self.average
        if self.window <= 0 or avg is None:
            return 0
        if avg * self.concurrency <= self.window:
            return self.concurrency
        return min(self.concurrency, int(self.concurrency * self.window / avg))

    def free(self) -> int:
        """Jobs the fetcher may claim now."""
        return max(0, self.concurrency + self.ahead - self.held)

    async def take(
        self,
        most: int,
        stop: asyncio.Event,
        budget: Callable[[], int] | None = None,
        queued: Callable[[], int] | None = None,
    ) -> int:
        """Wait for free slots (and a positive ``budget``, if given), then take up to ``most`` of them.

        While ``queued()`` jobs are already in line here, wait until a quarter of the limit is free (or
        ``most``), so claims go out in batches instead of one per finished job; with nothing in line, any
        free slot is taken at once.
        """
        while not stop.is_set():
            n = min(self.free(), most)
            if budget is not None:
                n = min(n, budget())
            batch = min(most, max(1, (self.concurrency + self.ahead) // 4))
            if 0 < n < batch and queued is not None and queued() > 0:
                n = 0  # jobs are in line: wait for a batch's worth of free slots
            if n > 0:
                self.held += n
                return n
            self._event.clear()
            await wait_first(self._event.wait(), stop.wait())
        return 0

    def give(self, n: int = 1) -> None:
        """Return ``n`` slots (handlers finished, or a claim brought fewer jobs than asked)."""
        self.held -= n
        self._event.set()

    def observe(self, seconds: float) -> None:
        """Fold one handler's run time into the average that sizes the claim-ahead."""
        avg = self.average
        self.average = seconds if avg is None else avg + (seconds - avg) * 0.1


class Delivery:
    """One claimed job in this process: its id, fencing token, raw envelope and handler task."""

    __slots__ = (
        "ack", "attempts", "cancel_reason", "env", "envelope", "finishing", "holds_slot", "id", "raw",
        "stalls", "started", "task", "token",
    )  # fmt: skip

    def __init__(self, job: Claimed) -> None:
        # Ids go back to Redis as the exact bytes the claim returned: a raw write can make an id that is not
        # UTF-8, and it must neither crash the worker nor address another job.
        self.raw = job.id
        self.id = job.id.decode("utf-8", "surrogateescape")
        self.token = job.token
        self.envelope = job.envelope
        self.attempts = job.attempts
        self.stalls = job.stalls
        self.task: asyncio.Task[Any] | None = None
        """The task running the handler, while it runs (a lane runs many jobs one after another)."""
        self.env: Envelope | None = None
        self.ack: asyncio.Future[bool] | None = None
        """The completion on its way to Redis, once the handler returned."""
        self.cancel_reason: str | None = None
        self.finishing = False  # an ack (complete/fail/retry) is on its way: a renewal may race with it
        self.started = False  # a lane took it: a drain lets it finish (jobs still in line are released)
        self.holds_slot = True  # counted in Slots.held until the handler finishes


class QueueRunner:
    """Per-queue state of a worker: processors, slots, deliveries in flight, pending acks."""

    def __init__(self, queue: Queue, concurrency: int | None, prefetch_window: float) -> None:
        self.queue = queue
        self.keys = queue.keys
        self.concurrency = {
            name: (concurrency or proc.concurrency) for name, proc in queue.processors.items()
        }
        self.lanes = {name: Lanes(n) for name, n in self.concurrency.items()}
        self.limiters = {name: anyio.CapacityLimiter(n) for name, n in self.concurrency.items()}
        self.slots = Slots(sum(self.concurrency.values()), prefetch_window)
        self.in_flight: dict[str, Delivery] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        """Lanes and one-off tasks running handlers or recording failures."""
        self.pending_acks: list[tuple[Delivery, bytes, asyncio.Future[bool]]] = []
        self.ack_event = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    def queued(self) -> int:
        """Jobs claimed here that wait in line for a lane."""
        return sum(len(lanes.ready) for lanes in self.lanes.values())

    def running(self) -> int:
        """Jobs whose handler runs now: at most the processors' lanes (an ack on its way is not counted)."""
        return sum(1 for d in self.in_flight.values() if d.task is not None and not d.finishing)

    def free_slot(self, d: Delivery) -> None:
        """The handler of ``d`` is done: its slot may take the next job while the ack is on its way."""
        if d.holds_slot:
            d.holds_slot = False
            self.slots.give(1)
