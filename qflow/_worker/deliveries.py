"""What a worker holds for each claimed job and each queue: a delivery's states, lanes, slots.

A *delivery* is one claim of one job by this worker, fenced by the claim's token. Its lifecycle is data, in
the style of h11's ``_state.py``: ``DeliveryState`` says where a delivery is, ``MOVES`` lists every move the
worker makes, and ``Delivery.move`` is the only way to change state (a move not in the table raises
``IllegalMove``). A job that runs and completes goes claimed -> running -> acking -> done (queued first if
every lane of its processor is busy). The whole table (a unit test holds this list to ``MOVES``)::

    claimed   -> queued, running, lost, releasing
    queued    -> running, lost, releasing
    running   -> acking, lost, releasing, done
    acking    -> done
    lost      -> done
    releasing -> released

``CancelReason`` names why the worker takes a job away from its handler; each reason is the state it leads to.
The rest of this module is the per-queue bookkeeping around deliveries: ``QueueRunner`` (deliveries in flight,
acks on their way), ``LaneState`` (one processor's lanes) and ``Slots`` (the claim budget), and the one
per-process ``SuspectGate`` (a job recovered after a crash runs alone).
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from .aio import wait_first

if TYPE_CHECKING:
    from .._broker.scripts import Claimed
    from .._codec import Envelope
    from .._queue import Queue

__all__ = (
    "CANCELLABLE",
    "MOVES",
    "TERMINAL",
    "CancelReason",
    "Delivery",
    "DeliveryState",
    "IllegalMove",
    "LaneState",
    "QueueRunner",
    "Slots",
    "SuspectGate",
)


class DeliveryState(enum.Enum):
    """Where one delivery is in this worker.

    - ``CLAIMED``: claimed (its id is in ``active`` under this worker's lease), handed to a lane or a one-off
      task that has not begun it yet
    - ``QUEUED``: claimed ahead, waiting in line for a free lane of its processor
    - ``RUNNING``: its handler runs in a lane (or its rejection, for an unknown name or a bad envelope)
    - ``ACKING``: its outcome (complete, fail or retry) is on its way to Redis; neither a lost renewal (the
      ack took the token) nor a stop cancels it
    - ``LOST``: its lease was lost (expired, or recovered by another worker): its handler is cancelled and its
      outcome is not this worker's to record
    - ``RELEASING``: cancelled at a stop (unstarted, or past the drain timeout): the drain hands the job back
      to waiting without spending an attempt
    - ``RELEASED`` (final): handed back (or, if Redis was unreachable, left to its lease's expiry)
    - ``DONE`` (final): finished here: its outcome recorded or refused as stale; or forgotten after a loss,
      or with nothing recorded (an internal error, or acks closed at the end of a stop: the lease expires)
    """

    CLAIMED = "claimed"
    QUEUED = "queued"
    RUNNING = "running"
    ACKING = "acking"
    LOST = "lost"
    RELEASING = "releasing"
    RELEASED = "released"
    DONE = "done"

    # Members are singletons compared by identity; Enum's own hash is a Python-level hash(name), about
    # 0.2 µs a call on 3.11 (measured), and every move hashes twice.
    __hash__ = object.__hash__


# Module-level names for the hot path: an Enum attribute lookup costs about 0.2 µs on 3.11, a global next to
# nothing (measured), and a job makes three moves.
CLAIMED = DeliveryState.CLAIMED
QUEUED = DeliveryState.QUEUED
RUNNING = DeliveryState.RUNNING
ACKING = DeliveryState.ACKING
LOST = DeliveryState.LOST
RELEASING = DeliveryState.RELEASING
RELEASED = DeliveryState.RELEASED
DONE = DeliveryState.DONE

MOVES: dict[DeliveryState, frozenset[DeliveryState]] = {
    CLAIMED: frozenset({QUEUED, RUNNING, LOST, RELEASING}),
    QUEUED: frozenset({RUNNING, LOST, RELEASING}),
    RUNNING: frozenset({ACKING, LOST, RELEASING, DONE}),
    ACKING: frozenset({DONE}),
    LOST: frozenset({DONE}),
    RELEASING: frozenset({RELEASED}),
    RELEASED: frozenset(),
    DONE: frozenset(),
}
"""State -> the states a delivery may move to from it (every move the worker makes is a row here)."""

TERMINAL = frozenset(s for s, exits in MOVES.items() if not exits)
"""States a delivery never leaves."""

CANCELLABLE = frozenset({CLAIMED, QUEUED, RUNNING})
"""States a cancel moves out of (into LOST or RELEASING): not yet acking, not already cancelled."""


class CancelReason(enum.Enum):
    """Why the worker takes a job away from its handler; the value is the state the delivery moves to."""

    LOST = DeliveryState.LOST
    """Its lease is gone (a renewal said so): another delivery may own the job now."""
    RELEASE = DeliveryState.RELEASING
    """The worker stops: the job goes back to waiting, attempt unspent."""


class IllegalMove(RuntimeError):
    """A delivery was asked to make a move ``MOVES`` does not allow (a bug in the worker)."""


class Delivery:
    """One claimed job in this process: its id, fencing token, raw envelope, state and handler task."""

    __slots__ = (
        "ack", "attempts", "env", "envelope", "holds_slot", "id", "raw", "stalls", "state", "task", "thread",
        "token",
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
        self.state = CLAIMED
        self.env: Envelope | None = None
        """The decoded envelope, once a lane may run it."""
        self.task: asyncio.Task[Any] | None = None
        """The task running the handler, while it runs (a lane runs many jobs one after another)."""
        self.ack: asyncio.Future[bool] | None = None
        """The completion on its way to Redis once the handler returned (its callback finishes ``self``)."""
        self.holds_slot = True  # counted in Slots.held until the handler finishes (given back exactly once)
        self.thread: asyncio.Future[Any] | None = None
        """A sync handler's thread, as a future; it may outlive the run (a timeout, a lost lease)."""

    def __repr__(self) -> str:
        return f"<Delivery {self.id!r} {self.state.value}>"

    def move(self, to: DeliveryState) -> None:
        """Move to ``to``; raise ``IllegalMove`` if ``MOVES`` has no such move."""
        if to not in MOVES[self.state]:
            raise IllegalMove(f"{self!r}: no move {self.state.value} -> {to.value}")
        self.state = to

    def cancel(self, reason: CancelReason) -> bool:
        """Take the job away from its handler; False if it is not this worker's to cancel (acking or final).

        A delivery that has not begun will not start; a running handler is cancelled. One already cancelled
        keeps its first reason (a job lost while being released stays lost), and its handler is cancelled
        again: it may have swallowed the first cancellation.
        """
        state = self.state
        if state in CANCELLABLE:
            self.move(reason.value)
        elif state is not LOST and state is not RELEASING:
            return False
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        return True


class LaneState:
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

    def keep(self) -> None:
        """Hold one more slot, outside any delivery (a sync handler's thread that outlived its run)."""
        self.held += 1

    def give(self, n: int = 1) -> None:
        """Return ``n`` slots (handlers finished, or a claim brought fewer jobs than asked)."""
        self.held -= n
        self._event.set()

    def observe(self, seconds: float) -> None:
        """Fold one handler's run time into the average that sizes the claim-ahead."""
        avg = self.average
        self.average = seconds if avg is None else avg + (seconds - avg) * 0.1


def _nothing() -> None:
    return None


class SuspectGate:
    """One worker's hold on a *suspect*: a delivered job that was recovered after a crash (``stalls > 0``).

    A job that killed its worker process once may do it again, and every job claimed by that process at the
    time would be charged a stall with it. So a suspect runs alone: a worker holds at most one at a time
    (the lanes start it once nothing else is in flight and no claim is out: ``busy``), the fetchers of every
    queue claim nothing while one is held, and other suspects (or any job a claim brings while one is held)
    are handed back at once, attempt unspent. The gate opens when the suspect's delivery is done here.
    """

    __slots__ = ("busy", "on_change", "opened", "runner", "started", "suspect")

    def __init__(self) -> None:
        self.suspect: Delivery | None = None
        """The suspect held now, claimed and leased (it is in its runner's ``in_flight``)."""
        self.runner: QueueRunner | None = None
        """The runner of the suspect's queue."""
        self.started = False
        """Whether the suspect was handed to its lanes (from then on nothing else starts until it is done)."""
        self.busy = 0
        """Claims out (and hand-backs of what they brought): jobs that may soon be this worker's."""
        self.opened = asyncio.Event()
        """Set while no suspect is held: what the fetchers wait for."""
        self.opened.set()
        self.on_change: Callable[[], None] = _nothing
        """Called when a delivery is done while a suspect waits (the lanes check whether it may start)."""

    def hold(self, r: QueueRunner, d: Delivery) -> None:
        """Hold ``d`` (of ``r``) as the suspect; the fetchers stop claiming."""
        self.suspect = d
        self.runner = r
        self.started = False
        self.opened.clear()

    def open(self) -> None:
        """No suspect any more: the fetchers claim again."""
        self.suspect = None
        self.runner = None
        self.started = False
        self.opened.set()

    def finished(self, d: Delivery) -> None:
        """A delivery is done here while a suspect is held (``QueueRunner.finish``)."""
        if d is self.suspect:
            self.open()
        elif not self.started:
            self.on_change()


class QueueRunner:
    """Per-queue state of a worker: processors, slots, deliveries in flight, pending acks."""

    def __init__(
        self, queue: Queue, concurrency: int | None, prefetch_window: float, gate: SuspectGate | None = None
    ) -> None:
        self.queue = queue
        self.gate = gate if gate is not None else SuspectGate()
        """The worker's suspect gate, shared by all its queues."""
        self.keys = queue.keys
        self.concurrency = {
            name: (concurrency or proc.concurrency) for name, proc in queue.processors.items()
        }
        self.lanes = {name: LaneState(n) for name, n in self.concurrency.items()}
        self.limiters = {name: anyio.CapacityLimiter(n) for name, n in self.concurrency.items()}
        self.slots = Slots(sum(self.concurrency.values()), prefetch_window)
        self.in_flight: dict[str, Delivery] = {}
        """Job id -> its delivery here. A job can come back while an earlier delivery of it still runs here
        (its lease was lost and its handler ignored the cancel): the newer delivery takes the entry."""
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
        return sum(1 for d in self.in_flight.values() if d.task is not None and d.state is not ACKING)

    def free_slot(self, d: Delivery) -> None:
        """The handler of ``d`` is done: its slot may take the next job while the ack is on its way."""
        if d.holds_slot:
            d.holds_slot = False
            self.slots.give(1)

    def forget(self, d: Delivery) -> None:
        """Drop ``d`` from the deliveries in flight (unless a newer delivery of its job took the entry)."""
        if self.in_flight.get(d.id) is d:
            del self.in_flight[d.id]
        self.free_slot(d)

    def finish(self, d: Delivery) -> None:
        """``d``'s work here is over: it is done and forgotten, or (releasing) kept for the drain."""
        state = d.state
        if state is not RELEASING and state is not RELEASED:
            d.move(DONE)
            if self.in_flight.get(d.id) is d:
                del self.in_flight[d.id]
        if d.holds_slot:  # free_slot(d), inlined: once per job, and most jobs gave their slot back already
            d.holds_slot = False
            self.slots.give(1)
        if not self.in_flight:
            self.idle.set()
        gate = self.gate
        if gate.suspect is not None:
            gate.finished(d)
