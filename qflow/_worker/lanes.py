"""Running claimed jobs in their processors' lanes.

Each processor has ``concurrency`` *lanes*: tasks that run its jobs one after another (a sync handler in a
thread, never on the event loop). A claimed job starts a new lane while the processor has fewer, else it
waits in line for the next free one. A job that needs no handler (an undecodable envelope, an unknown name)
is failed by a one-off task. A handler's outcome goes to the acker (``acks.py``).

A thread cannot be stopped: when a sync handler's run ends before its thread does (its timeout, a lost
lease), the outcome is recorded at once, but the lane (and one claim slot) waits for the thread to end
before its next job, so a processor never has more than ``concurrency`` threads running in a process.

A job recovered after a crash (a *suspect*, ``stalls > 0``) runs alone in this process: ``hold`` keeps it
(claimed, leased) until nothing else is in flight and no claim is out, then starts it; nothing else starts
until it is done (see ``deliveries.SuspectGate``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from .. import _codec
from .._job import Job
from .._state import decide_after_error
from ..exceptions import PayloadError, Retry
from .deliveries import CLAIMED, LOST, QUEUED, RELEASING, RUNNING, CancelReason, SuspectGate

if TYPE_CHECKING:
    from .._codec import Envelope
    from .._options import ResolvedOptions
    from .._processor import Processor
    from .acks import Acker
    from .deliveries import Delivery, LaneState, QueueRunner
    from .shared import Shared

__all__ = ("Lanes", "effective_options")

log = logging.getLogger("qflow._worker")

_A = TypeVar("_A")


def effective_options(env: Envelope, proc: Processor[Any, Any]) -> ResolvedOptions:
    """The options one run of a job uses: its own where it set them, else its processor's, else qflow's."""
    return env.options.over(proc.options)


class Lanes:
    """Hands claimed jobs to their processors' lanes and runs them there."""

    def __init__(self, shared: Shared, acker: Acker) -> None:
        self.shared = shared
        self.acker = acker
        self.gate = SuspectGate()
        """The worker's suspect gate (one for all its queues): the fetchers read it, runners report to it."""
        self.gate.on_change = self.try_suspect

    def hold(self, r: QueueRunner, d: Delivery) -> None:
        """Take ``d``, a job recovered after a crash, as the suspect: it starts alone, once nothing else is
        in flight here and no claim is out (``try_suspect``); its lease is renewed meanwhile."""
        if not r.in_flight:
            r.idle.clear()
        r.in_flight[d.id] = d
        self.gate.hold(r, d)
        log.info(
            "job %s:%s was recovered after its worker stopped (%d time(s)): it runs alone in this process, "
            "after the %d job(s) in flight here",
            r.queue.name,
            d.id,
            d.stalls,
            self.shared.in_flight() - 1,
        )
        self.try_suspect()

    def try_suspect(self) -> None:
        """Start the suspect held, if nothing else is in flight in this worker and no claim is out."""
        gate = self.gate
        d, r = gate.suspect, gate.runner
        if d is None or r is None or gate.started or gate.busy or self.shared.stopping:
            return  # at a stop, the drain hands it back unstarted
        for other in self.shared.runners:
            if len(other.in_flight) > (1 if other is r else 0):
                return
        gate.started = True
        if d.state is CLAIMED and r.in_flight.get(d.id) is d:
            self.start(r, d)
            return
        # Its lease was lost while it waited: not this worker's to run (finishing it opens the gate).
        d.cancel(CancelReason.LOST)
        self.shared.finish(r, d, handled=False)

    def start(self, r: QueueRunner, d: Delivery) -> None:
        """Hand a claimed job to its processor's lanes: a free lane runs it now, else it waits in line."""
        # ``idle`` is set only while nothing is in flight (QueueRunner.finish): cleared once, not per job. A
        # newer delivery of a job still running here takes its entry (see QueueRunner.in_flight).
        if not r.in_flight:
            r.idle.clear()
        r.in_flight[d.id] = d
        q = r.queue
        try:
            env = _codec.decode_envelope(d.envelope)
        except PayloadError as exc:
            self._spawn(r, self._reject(r, d, _codec.ErrorInfo.from_exception(exc, "payload")), d.id)
            return
        proc = q.processors.get(env.name)
        if proc is None:
            err = _codec.ErrorInfo(
                type="UnknownJobName",
                message=f"no processor registered for job name {env.name!r} on queue {q.name!r} "
                f"(registered: {', '.join(sorted(q.processors))})",
                kind="unknown_name",
            )
            self._spawn(r, self._reject(r, d, err), d.id)
            return
        d.env = env
        lanes = r.lanes[proc.name]
        if lanes.running < lanes.limit:
            lanes.running += 1
            self._spawn(r, self._lane(r, lanes, proc, d), f"{q.name}:{proc.name}")
        else:
            d.move(QUEUED)
            lanes.ready.append(d)

    def _spawn(self, r: QueueRunner, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"qflow-{what}")
        r.tasks.add(task)
        task.add_done_callback(r.tasks.discard)

    async def _lane(self, r: QueueRunner, lanes: LaneState, proc: Processor[Any, Any], d: Delivery) -> None:
        """One of a processor's ``concurrency`` lanes: run jobs one after another while some wait in line.

        The next job starts the moment a handler returns, in the same task, with its ack still on its way:
        no task per job and no hand-off through the event loop between two jobs.
        """
        task = asyncio.current_task()
        assert task is not None
        shared = self.shared
        try:
            nxt: Delivery | None = d
            while nxt is not None:
                await self._run_one(r, nxt, task, self._execute, proc)
                thread = nxt.thread
                if thread is not None and not thread.done():
                    await self._outlived(r, proc, nxt, thread)
                nxt = None
                while lanes.ready and not shared.stopping:
                    candidate = lanes.ready.popleft()
                    if candidate.state is QUEUED:
                        nxt = candidate
                        break
                    shared.finish(r, candidate, handled=False)  # lost or released while it waited
        finally:
            lanes.running -= 1

    async def _outlived(
        self, r: QueueRunner, proc: Processor[Any, Any], d: Delivery, thread: asyncio.Future[Any]
    ) -> None:
        """The run of ``d`` ended (timeout, lost lease) while its sync handler's thread still runs: hold the
        lane, and one claim slot, until the thread ends. At a stop the lane lets go (the thread runs on)."""
        shared = self.shared
        stop = shared.stop
        if shared.stopping or stop is None:
            return
        log.warning(
            "job %s:%s: its sync handler runs on after its run ended (a thread cannot be stopped); "
            "one lane of %s waits for it",
            r.queue.name,
            d.id,
            proc.name,
        )
        r.slots.keep()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((thread, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            r.slots.give(1)

    async def _run_one(
        self,
        r: QueueRunner,
        d: Delivery,
        task: asyncio.Task[Any],
        work: Callable[[QueueRunner, Delivery, _A], Awaitable[None]],
        arg: _A,
    ) -> None:
        """Run ``work(r, d, arg)`` for one delivery in ``task`` (a lane or a one-off): cancellation, counts,
        cleanup. (No ``functools.partial`` per job: the arguments are passed through.)"""
        shared = self.shared
        state = d.state
        if state is LOST or state is RELEASING or shared.stopping:
            # Cancelled before it began, or dispatched as the worker stopped: hand it back unstarted (no
            # attempt spent; a lost one stays lost).
            d.cancel(CancelReason.RELEASE)
            shared.finish(r, d, handled=False)
            return
        d.move(RUNNING)
        d.task = task
        handled = False
        try:
            await work(r, d, arg)
            handled = d.state is not LOST and d.state is not RELEASING
        except asyncio.CancelledError:
            if d.state is not LOST and d.state is not RELEASING:
                raise
            # Cancelled by us: lost (lease gone; another delivery owns the job) or releasing (drain timeout:
            # the drain hands the job back). Nothing to ack here.
        except Exception:
            log.exception("internal error while running job %s:%s", r.queue.name, d.id)
        finally:
            d.task = None
            if d.state is LOST or d.state is RELEASING:
                while task.cancelling():  # ours, for this job (its handler may have swallowed it)
                    task.uncancel()
            if d.ack is None:
                shared.finish(r, d, handled)
            # else: the acker finishes it when the ack's round trip returns

    async def _reject(self, r: QueueRunner, d: Delivery, info: _codec.ErrorInfo) -> None:
        """Fail a job that cannot run here (undecodable envelope, unknown name), in a one-off task."""
        task = asyncio.current_task()
        assert task is not None
        await self._run_one(r, d, task, self.acker.fail, info)

    async def _execute(self, r: QueueRunner, d: Delivery, proc: Processor[Any, Any]) -> None:
        """Decode the payload, call the handler, and hand its outcome to the acker."""
        q = r.queue
        env = d.env
        assert env is not None
        acker = self.acker
        try:
            payload = proc.decode_payload(bytes(env.payload))
        except PayloadError as exc:
            await acker.fail(r, d, _codec.ErrorInfo.from_exception(exc, "payload"))
            return
        job: Job[Any] = Job(q, d.id, env.name, payload, attempt=d.attempts + 1, stalls=d.stalls)
        options = effective_options(env, proc)
        timeout = options.timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await self._call(r, d, proc, job, timeout)
        except asyncio.CancelledError:
            raise
        except _HandlerTimeout as exc:
            error: Exception = exc
            info = _codec.ErrorInfo(
                type="TimeoutError",
                message=f"{q.name}:{proc.name} exceeded its timeout of {timeout}s",
                traceback=_codec.ErrorInfo.from_exception(exc).traceback,
                kind="timeout",
            )
        except Exception as exc:
            error = exc
            info = _codec.ErrorInfo.from_exception(exc)
        else:
            r.slots.observe(loop.time() - started)
            await acker.complete(r, d, proc, result)
            return
        r.slots.observe(loop.time() - started)
        decision = decide_after_error(
            attempts_spent=d.attempts,
            max_attempts=options.attempts,
            backoff=options.backoff,
            requested_delay=error.delay if isinstance(error, Retry) else None,
        )
        if decision.retry:
            log.info(
                "job %s:%s attempt %d failed (%s: %s); retry in %.2fs",
                q.name,
                d.id,
                job.attempt,
                info.type,
                info.message,
                decision.delay,
            )
            await acker.retry(r, d, decision.delay, info)
        else:
            await acker.fail(r, d, info, spent=True)

    async def _call(
        self, r: QueueRunner, d: Delivery, proc: Processor[Any, Any], job: Job[Any], timeout: float | None
    ) -> Any:
        """Call the handler: a coroutine on the loop, a sync function in a thread; bounded by ``timeout``."""
        # No typing.cast here: it is a Python call, and this runs once per job (proc.fn returns Any anyway).
        coro: Awaitable[Any]
        if proc.is_async:
            coro = proc.fn(job)
        else:
            # A sync handler never runs on the event loop. A thread cannot be interrupted: on timeout (or a
            # cancel) the run ends and its result is ignored, but the shielded thread keeps its limiter
            # token, and the lane waits for it (``d.thread``) before its next job.
            thread = asyncio.ensure_future(
                anyio.to_thread.run_sync(proc.fn, job, limiter=r.limiters[proc.name], abandon_on_cancel=True)
            )
            d.thread = thread
            coro = asyncio.shield(thread)
        if timeout is None:
            return await coro
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except TimeoutError as exc:
            raise _HandlerTimeout() from exc


class _HandlerTimeout(Exception):
    """The handler ran past its timeout (internal; recorded as a TimeoutError)."""
