"""One worker process's loop: claim -> run in one of the processor's lanes -> ack; leases; recovery; drain.

Shape (one task group per worker):

- a *fetcher* per queue claims jobs in batches sized by free concurrency, and blocks on the server
  (``BLMOVE wait wait``, which wakes without taking the job) when there is nothing to claim;
- each processor has ``concurrency`` *lanes*, tasks that run its jobs one after another (sync handlers in a
  thread); jobs claimed ahead wait in line for the next free lane, and a failure that needs no handler
  (undecodable envelope, unknown name) is recorded by a one-off task;
- an *acker* per queue sends the completions that piled up while the previous batch was in flight, as one
  script call;
- one *renewer* extends every lease this process holds, all queues in one pipelined round trip, and cancels
  handlers whose lease was lost;
- a *checker* per queue runs the stalled-job recovery (one checker acts per interval fleet-wide).

A job id is never only in this process's memory: the claim script moves it from ``wait`` into ``active``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import signal
import socket
import typing
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .. import _codec
from .._broker import commands, scripts
from .._broker.errors import ErrorReply, translated
from .._broker.servercheck import check_server
from .._queue import Job, Queue
from .._settings import WorkerSettings
from .._state import decide_after_error
from ..exceptions import BrokerFull, BrokerUnavailable, ConfigurationError, PayloadError, QflowError, Retry
from .aio import as_coro, cancel_until_done, wait_first
from .deliveries import Delivery, Lanes, QueueRunner

if TYPE_CHECKING:
    from .._app import App
    from .._processor import Processor

__all__ = ("Worker",)

# One logger name for all the worker's parts: log lines and logging config read as before the split.
log = logging.getLogger("qflow._worker")

_RELEASE_GRACE = 1.0  # seconds a cancelled handler gets to unwind before its job is released anyway


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
        if max_jobs is not None and max_jobs < 1:
            raise ConfigurationError(f"max_jobs must be >= 1 or None, got {max_jobs!r}")
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
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
        self.jobs_done = 0
        """Jobs this worker completed."""
        self.jobs_failed = 0
        """Jobs this worker recorded as failed for good (handler errors, bad payloads, unknown names)."""
        self.jobs_retried = 0
        """Failed attempts this worker scheduled for a retry."""
        self.jobs_handled = 0
        """Jobs this worker finished in any way (completed, failed, retried)."""
        self.stale_acks = 0
        self.ready = asyncio.Event()
        """Set once the worker is fetching."""
        self.server_warnings: list[str] = []
        """Settings of the server that weaken a guarantee (AOF off, an evicting policy), found at start."""
        self._stop: asyncio.Event | None = None
        self._fast = False
        self._runners: list[QueueRunner] = []
        self._acks_closed = False
        self._claim_behind = True
        self._parked: dict[QueueRunner, int] = {}  # fetchers blocked in _wait_then_claim: their client ids
        self._unblocks: set[asyncio.Task[Any]] = set()

    # -- control -----------------------------------------------------------------------------------------

    def stop(self, *, fast: bool = False) -> None:
        """Ask the worker to stop: finish in-flight jobs up to the drain timeout (``fast``: release now)."""
        self._fast = self._fast or fast
        if self._stop is not None:
            self._stop.set()
            self._unpark()
            if fast:
                # Also mid-drain (issue #3: a supervisor's second signal): cancel handlers now, as the second
                # SIGTERM in _on_signal does; _drain then releases their jobs.
                self._cancel_unfinished()

    @property
    def in_flight(self) -> int:
        """Jobs this worker holds right now."""
        return sum(len(r.in_flight) for r in self._runners)

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Queue name -> (jobs whose handler runs now, jobs claimed ahead that wait for a lane).

        The first is bounded by the processors' concurrency; ``in_flight`` also counts acks on their way.
        """
        return {r.queue.name: (r.running(), r.queued()) for r in self._runners}

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop is not None and self._stop.is_set()

    def job_of_task(self, task: asyncio.Task[Any]) -> tuple[str, str] | None:
        """``(queue:processor, job id)`` of the job a task runs now, or None (for loop-blocking warnings)."""
        for r in self._runners:
            for d in r.in_flight.values():
                if d.task is task:
                    return f"{r.queue.name}:{d.env.name if d.env is not None else '?'}", d.id
        return None

    async def run(self, *, handle_signals: bool = False) -> None:
        """Run until ``stop()`` (or, in burst mode, until the queues are drained), then drain and return."""
        self._stop = asyncio.Event()
        window = self.settings.prefetch_window
        self._runners = [QueueRunner(q, self._concurrency, window) for q in self.queues]
        self.server_warnings = await check_server(self.app.redis())
        await scripts.load_all(self.app.redis())
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        log.info(
            "worker %s started: queues %s",
            self.id,
            ", ".join(f"{r.queue.name}(c={r.slots.concurrency})" for r in self._runners),
        )
        background: list[asyncio.Task[None]] = []
        try:
            background.append(asyncio.create_task(self._renew_loop(), name="qflow-renew"))
            background += [
                asyncio.create_task(as_coro(companion(self)), name=f"qflow-companion-{i}")
                for i, companion in enumerate(self.companions)
            ]
            background += [
                asyncio.create_task(self._check_loop(r), name=f"qflow-check-{r.queue.name}")
                for r in self._runners
            ]
            background += [
                asyncio.create_task(self._ack_loop(r), name=f"qflow-ack-{r.queue.name}")
                for r in self._runners
            ]
            fetchers = [
                asyncio.create_task(self._fetch_loop(r), name=f"qflow-fetch-{r.queue.name}")
                for r in self._runners
            ]
            self.ready.set()
            try:
                await asyncio.gather(*fetchers)
            finally:
                await cancel_until_done(fetchers)
            await self._drain()
        finally:
            await cancel_until_done(background)
            self._acks_closed = True
            for r in self._runners:
                for _, _, fut in r.pending_acks:
                    if not fut.done():
                        fut.set_result(False)
                r.pending_acks.clear()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            log.info(
                "worker %s stopped: %d jobs handled (%d completed, %d failed, %d retried)",
                self.id,
                self.jobs_handled,
                self.jobs_done,
                self.jobs_failed,
                self.jobs_retried,
            )

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop is not None and self._stop.is_set():
            log.warning("second %s: stopping now, releasing unfinished jobs", sig.name)
            self._fast = True
            self._stop.set()
            self._unpark()
            self._cancel_unfinished()
        else:
            log.info(
                "%s: draining (up to %.0fs); send again to stop now",
                sig.name,
                self.settings.drain_timeout,
            )
            self.stop()

    # -- fetching ----------------------------------------------------------------------------------------

    async def _fetch_loop(self, r: QueueRunner) -> None:
        assert self._stop is not None
        stop = self._stop
        client = self.app.redis()
        k = r.keys
        lease_ms = int(self.settings.lease_ttl * 1000)
        # The envelope adds the name and options to the payload: allow a margin over max_payload_bytes.
        max_envelope = self.app.max_payload_bytes + 64 * 1024
        too_large = _codec.encode_error(
            _codec.ErrorInfo(
                type="PayloadTooLarge",
                message=f"stored job is over {max_envelope:,} bytes (max_payload_bytes "
                f"{self.app.max_payload_bytes:,} + 64 KiB of envelope); it was written around add()",
                kind="payload",
            )
        )
        budget = None if self.max_jobs is None else self._job_budget
        failures = 0
        carried: tuple[int, scripts.ClaimReply] | None = None  # (slots taken, reply) from _wait_then_claim
        while not stop.is_set():
            if carried is not None:
                (n, res), carried = carried, None
            else:
                n = await r.slots.take(self.settings.claim_batch, stop, budget, r.queued)
                if n == 0:
                    break
                try:
                    res = await scripts.claim(
                        client, k, count=n, lease_ms=lease_ms, max_envelope=max_envelope, too_large=too_large
                    )
                    failures = 0
                except (BrokerUnavailable, BrokerFull) as exc:
                    r.slots.give(n)
                    failures += 1
                    log.warning("claim on %s failed (%s); retrying", r.queue.name, exc)
                    await wait_first(stop.wait(), asyncio.sleep(min(0.1 * 2**failures, 2.0)))
                    continue
            next_due_ms, waiting, jobs = res
            for job in jobs:
                self._start(r, Delivery(job))
            got = len(jobs)
            if got < n:
                r.slots.give(n - got)
            if waiting:
                continue
            # Nothing left to claim: block until a push (an empty claim round trip first would be wasted).
            if self.burst and not got and await self._drained(r):
                break
            timeout = self.settings.block_timeout
            if next_due_ms >= 0:
                timeout = min(timeout, next_due_ms / 1000)
            if timeout <= 0:
                continue
            # The wait must end well inside the socket timeout, which is what detects a dead server.
            timeout = min(timeout, self.app.socket_timeout * 0.8)
            if self.burst or not (self.settings.claim_behind_wait and self._claim_behind):
                await self._wait_for_work(r, timeout)
                continue
            # One job: an idle worker that freezes or loses its network while parked holds at most that one
            # (until its lease expires); the claims that follow take the rest in batches.
            n = await r.slots.take(1, stop, budget)
            if n == 0:
                break
            behind = await self._wait_then_claim(r, timeout, n, lease_ms, max_envelope, too_large)
            if behind is None:
                r.slots.give(n)
            else:
                carried = (n, behind)

    def _job_budget(self) -> int:
        """With ``max_jobs``: jobs this worker may still claim (those it holds count as handled soon)."""
        assert self.max_jobs is not None
        return self.max_jobs - self.jobs_handled - self.in_flight

    async def _wait_for_work(self, r: QueueRunner, timeout: float) -> None:
        """Block on the server until a job is pushed (``BLMOVE wait wait`` rotates, taking nothing)."""
        assert self._stop is not None
        blocking = commands.wait_for_push(self.app.redis(), r.keys.wait, timeout)
        waits: list[Awaitable[Any]] = [blocking, self._stop.wait()]
        if self.burst and r.in_flight:
            waits.append(r.idle.wait())
        try:
            await wait_first(*waits)
        except (QflowError, ErrorReply) as exc:
            # BrokerFull: OOM at maxmemory (BLMOVE is a deny-oom write); claims still work then.
            log.warning("blocking wait on %s failed (%s)", r.queue.name, exc)
            await wait_first(self._stop.wait(), asyncio.sleep(min(timeout, 0.2)))

    async def _wait_then_claim(
        self, r: QueueRunner, timeout: float, n: int, lease_ms: int, max_envelope: int, too_large: bytes
    ) -> scripts.ClaimReply | None:
        """Block until a push with a claim of ``n`` queued behind the blocking call, on one connection.

        The server runs the claim the moment the wait ends, so an idle worker's pickup costs one round trip
        instead of two (see ``scripts.wait_then_claim``). The claim is still the one script that moves ids
        into ``active`` under a lease. ``stop()`` never abandons this call (a claim that ran would leave its
        jobs to lease expiry): it ends the wait with ``CLIENT UNBLOCK``, and jobs claimed after a stop are
        released at once. Returns the claim reply, or None (stopped, or the server failed). Where
        ``CLIENT ID`` is not allowed (ACLs), the worker falls back to waiting, then claiming.
        """
        stop = self._stop
        assert stop is not None

        def parked(client_id: int) -> None:
            self._parked[r] = client_id
            if stop.is_set():
                self._unpark()

        try:
            out = await scripts.wait_then_claim(
                self.app.redis(),
                r.keys,
                timeout=timeout,
                parked=parked,
                count=n,
                lease_ms=lease_ms,
                max_envelope=max_envelope,
                too_large=too_large,
            )
        finally:
            self._parked.pop(r, None)
        if out.refused is not None:
            self._claim_behind = False
            log.info(
                "CLIENT ID refused (%s): an idle worker waits, then claims (two round trips)", out.refused
            )
        if out.wait_error is not None:
            log.warning("blocking wait on %s failed (%s)", r.queue.name, out.wait_error)
        if out.claim_error is not None:
            log.warning("claim on %s failed (%s); retrying", r.queue.name, out.claim_error)
        if out.failed is not None:
            log.warning("blocking wait and claim on %s failed (%s)", r.queue.name, out.failed)
            await wait_first(stop.wait(), asyncio.sleep(min(timeout, 0.2)))
            return None
        res = out.reply
        if res is not None and stop.is_set():
            claimed = [Delivery(job) for job in res.jobs]
            if claimed:
                await self._release(r, claimed)
            return None
        return res

    def _unpark(self) -> None:
        """End the server-side waits of fetchers blocked in ``_wait_then_claim`` (at a stop)."""
        if not self._parked:
            return
        loop = asyncio.get_running_loop()
        for r, client_id in list(self._parked.items()):
            del self._parked[r]
            task = loop.create_task(commands.unblock(self.app.redis(), client_id), name="qflow-unblock")
            self._unblocks.add(task)
            task.add_done_callback(self._unblock_done)

    def _unblock_done(self, task: asyncio.Task[Any]) -> None:
        self._unblocks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The wait then ends by its own timeout (at most block_timeout).
            log.warning("could not end a fetcher's blocking wait at stop: %s", task.exception())

    async def _drained(self, r: QueueRunner) -> bool:
        if r.in_flight:
            return False
        k = r.keys
        try:
            with translated("the drained check"):
                async with self.app.redis().pipeline(transaction=True) as pipe:
                    pipe.llen(k.wait)
                    pipe.zcard(k.delayed)
                    pipe.zcard(k.active)
                    counts = await pipe.execute()
        except BrokerUnavailable:
            return False
        return not any(counts)

    # -- running -----------------------------------------------------------------------------------------

    def _start(self, r: QueueRunner, d: Delivery) -> None:
        """Hand a claimed job to its processor's lanes: a free lane runs it now, else it waits in line."""
        # A job can come back to this worker while an earlier delivery of it still runs here (its lease was
        # lost and its handler ignored the cancel): the new delivery takes the slot in in_flight, and the
        # old one's cleanup must not remove it (see _finish).
        r.in_flight[d.id] = d
        r.idle.clear()
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
            lanes.ready.append(d)

    def _spawn(self, r: QueueRunner, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=f"qflow-{what}")
        r.tasks.add(task)
        task.add_done_callback(r.tasks.discard)

    def _cancel(self, d: Delivery, reason: str) -> None:
        """Mark a delivery lost or released and cancel its handler if it runs (a waiting one is skipped)."""
        if d.cancel_reason is None:
            d.cancel_reason = reason
        if d.task is not None and not d.task.done():
            d.task.cancel()

    def _cancel_unfinished(self) -> None:
        """Release every job whose handler has not finished (a fast stop); acks on their way still land."""
        for r in self._runners:
            for d in list(r.in_flight.values()):
                if not d.finishing:
                    self._cancel(d, "release")

    async def _lane(self, r: QueueRunner, lanes: Lanes, proc: Processor[Any, Any], d: Delivery) -> None:
        """One of a processor's ``concurrency`` lanes: run jobs one after another while some wait in line.

        The next job starts the moment a handler returns, in the same task, with its ack still on its way:
        no task per job and no hand-off through the event loop between two jobs.
        """
        task = asyncio.current_task()
        assert task is not None
        try:
            nxt: Delivery | None = d
            while nxt is not None:
                await self._run_one(r, nxt, task, functools.partial(self._execute, r, nxt, proc))
                nxt = None
                while lanes.ready and not self.stopping:
                    candidate = lanes.ready.popleft()
                    if candidate.cancel_reason is None:
                        nxt = candidate
                        break
                    self._finish(r, candidate, handled=False)  # lost or released while it waited
        finally:
            lanes.running -= 1

    async def _run_one(
        self, r: QueueRunner, d: Delivery, task: asyncio.Task[Any], work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``work`` for one delivery in ``task`` (a lane or a one-off): cancellation, counts, cleanup."""
        if self.stopping:
            # Dispatched as the worker stopped: hand it back unstarted (no attempt spent).
            d.cancel_reason = d.cancel_reason or "release"
            self._finish(r, d, handled=False)
            return
        d.task = task
        d.started = True
        handled = False
        try:
            await work()
            handled = d.cancel_reason is None
        except asyncio.CancelledError:
            if d.cancel_reason is None:
                raise
            # Cancelled by us: "lost" (lease gone; another delivery owns the job) or "release" (drain
            # timeout: _drain hands the job back). Nothing to ack here.
        except Exception:
            log.exception("internal error while running job %s:%s", r.queue.name, d.id)
        finally:
            d.task = None
            if d.cancel_reason is not None:
                while task.cancelling():  # ours, for this job (its handler may have swallowed it)
                    task.uncancel()
            if d.ack is None:
                self._finish(r, d, handled)
            # else: _acked finishes it when the ack's round trip returns

    async def _reject(self, r: QueueRunner, d: Delivery, info: _codec.ErrorInfo) -> None:
        """Fail a job that cannot run here (undecodable envelope, unknown name), in a one-off task."""
        task = asyncio.current_task()
        assert task is not None
        await self._run_one(r, d, task, functools.partial(self._fail, r, d, info))

    def _finish(self, r: QueueRunner, d: Delivery, handled: bool) -> None:
        """A delivery is done here: count it, free its slot, forget it (released ones wait for _drain)."""
        if handled:
            self.jobs_handled += 1
            if self.max_jobs is not None and self.jobs_handled >= self.max_jobs and not self.stopping:
                log.info("handled %d jobs (max_jobs): stopping to be recycled", self.jobs_handled)
                self.stop()
        if d.cancel_reason != "release" and r.in_flight.get(d.id) is d:
            del r.in_flight[d.id]
        r.free_slot(d)
        if not r.in_flight:
            r.idle.set()

    def _acked(self, r: QueueRunner, d: Delivery, fut: asyncio.Future[bool]) -> None:
        if not fut.cancelled() and fut.result():
            self.jobs_done += 1
        self._finish(r, d, handled=True)

    async def _execute(self, r: QueueRunner, d: Delivery, proc: Processor[Any, Any]) -> None:
        q = r.queue
        env = d.env
        assert env is not None
        try:
            payload = proc.decode_payload(bytes(env.payload))
        except PayloadError as exc:
            await self._fail(r, d, _codec.ErrorInfo.from_exception(exc, "payload"))
            return
        job: Job[Any] = Job(q, d.id, env.name, payload, attempt=d.attempts + 1, stalls=d.stalls)
        timeout = env.timeout if env.timeout is not None else proc.timeout
        max_attempts = env.attempts if env.attempts is not None else proc.attempts
        backoff = env.backoff if env.backoff is not None else proc.backoff
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result = await self._call(r, proc, job, timeout)
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
            await self._complete(r, d, proc, result)
            return
        r.slots.observe(loop.time() - started)
        decision = decide_after_error(
            attempts_spent=d.attempts,
            max_attempts=max_attempts,
            backoff=backoff,
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
            await self._retry(r, d, decision.delay, info)
        else:
            await self._fail(r, d, info, spent=True)

    def _may_ack(self, d: Delivery) -> bool:
        """False for a delivery released or lost while its handler ignored the cancel, or after the worker
        stopped: its outcome is not ours to record (the job is back in Redis or owned by another delivery)."""
        return d.cancel_reason is None and not self._acks_closed

    async def _complete(self, r: QueueRunner, d: Delivery, proc: Processor[Any, Any], result: Any) -> None:
        """Queue the completion for the acker without waiting: ``_acked`` finishes the delivery when it lands.

        Only the rare unencodable result awaits (its failure is recorded before the lane moves on).
        """
        if not self._may_ack(d):
            return
        try:
            data = _codec.encode_payload(
                result,
                limit=self.app.max_payload_bytes,
                what=f"result of {r.queue.name}:{proc.name}",
            )
        except PayloadError as exc:
            await self._fail(r, d, _codec.ErrorInfo.from_exception(exc, "result"), spent=True)
            return
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        d.finishing = True
        d.ack = fut
        r.free_slot(d)
        r.pending_acks.append((d, data, fut))
        r.ack_event.set()
        fut.add_done_callback(functools.partial(self._acked, r, d))

    async def _call(
        self, r: QueueRunner, proc: Processor[Any, Any], job: Job[Any], timeout: float | None
    ) -> Any:
        if proc.is_async:
            fn = typing.cast("Callable[[Job[Any]], Awaitable[Any]]", proc.fn)
            coro = fn(job)
        else:
            sync_fn = typing.cast("Callable[[Job[Any]], Any]", proc.fn)
            # A sync handler never runs on the event loop. On timeout the thread cannot be interrupted: it
            # is abandoned (its result ignored) and the job moves on.
            coro = anyio.to_thread.run_sync(
                sync_fn, job, limiter=r.limiters[proc.name], abandon_on_cancel=True
            )
        if timeout is None:
            return await coro
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except TimeoutError as exc:
            raise _HandlerTimeout() from exc

    # -- acking ------------------------------------------------------------------------------------------

    async def _ack_loop(self, r: QueueRunner) -> None:
        client = self.app.redis()
        ret = r.queue.retention
        keep_age = -1 if ret.completed_age is None else int(ret.completed_age * 1000)
        notify_ttl = max(60_000, keep_age)
        while True:
            await r.ack_event.wait()
            r.ack_event.clear()
            batch, r.pending_acks = r.pending_acks, []
            for start in range(0, len(batch), 200):
                part = batch[start : start + 200]
                done = functools.partial(
                    scripts.complete,
                    client,
                    r.keys,
                    [(d.raw, d.token, data) for d, data, _ in part],
                    keep_count=ret.completed_count,
                    keep_age_ms=keep_age,
                    notify_ttl_ms=notify_ttl,
                )
                try:
                    flags: list[bool] = await self._with_retries(done)
                except Exception as exc:
                    log.error(
                        "could not record %d completions on %s: %s; their leases will expire "
                        "and the jobs run again",
                        len(part),
                        r.queue.name,
                        exc,
                    )
                    flags = [False] * len(part)
                for (d, _, fut), ok in zip(part, flags, strict=True):
                    if not ok:
                        self._stale(r, d, "complete")
                    if not fut.done():
                        fut.set_result(ok)

    async def _with_retries(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Retry an ack while Redis is unreachable, up to one lease TTL (after which it would be rejected)."""
        deadline = asyncio.get_running_loop().time() + self.settings.lease_ttl
        delay = 0.05
        while True:
            try:
                return await call()
            except BrokerUnavailable:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _stale(self, r: QueueRunner, d: Delivery, what: str) -> None:
        self.stale_acks += 1
        log.warning(
            "%s of job %s:%s rejected: its lease expired and the job was recovered "
            "(it may run again elsewhere)",
            what,
            r.queue.name,
            d.id,
        )

    async def _fail(self, r: QueueRunner, d: Delivery, info: _codec.ErrorInfo, *, spent: bool = True) -> None:
        """Record a job as failed for good. Every such failure is logged here, in one form, whatever
        its kind (a handler's error, a timeout, a bad payload, an unknown name, an unencodable result)."""
        if not self._may_ack(d):
            return
        log.warning(
            "job %s:%s failed after %d attempt(s): %s: %s",
            r.queue.name,
            d.id,
            d.attempts + 1,
            info.type,
            info.message,
        )
        ret = r.queue.retention
        keep_age = -1 if ret.failed_age is None else int(ret.failed_age * 1000)
        fail = functools.partial(
            scripts.fail,
            self.app.redis(),
            r.keys,
            d.raw,
            d.token,
            _codec.encode_error(info),
            spent=spent,
            keep_count=ret.failed_count,
            keep_age_ms=keep_age,
            notify_ttl_ms=max(60_000, keep_age),
        )
        d.finishing = True
        r.free_slot(d)
        ok = await self._with_retries(fail)
        if ok:
            self.jobs_failed += 1
        else:
            self._stale(r, d, "fail")

    async def _retry(self, r: QueueRunner, d: Delivery, delay: float, info: _codec.ErrorInfo) -> None:
        if not self._may_ack(d):
            return
        retry = functools.partial(
            scripts.retry,
            self.app.redis(),
            r.keys,
            d.raw,
            d.token,
            delay_ms=int(delay * 1000),
            error=_codec.encode_error(info),
        )
        d.finishing = True
        r.free_slot(d)
        ok = await self._with_retries(retry)
        if ok:
            self.jobs_retried += 1
        else:
            self._stale(r, d, "retry")

    # -- leases ------------------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        interval = self.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_leases()
            except QflowError as exc:
                log.warning("lease renewal failed (%s); retrying in %.1fs", exc, interval)
            except Exception:
                log.exception("lease renewal raised; retrying in %.1fs", interval)

    async def renew_leases(self) -> None:
        """Extend every lease this process holds: one pipelined round trip for all queues."""
        runners = [r for r in self._runners if r.in_flight]
        if not runners:
            return
        sent = [{d.raw: d for d in r.in_flight.values()} for r in runners]
        renewals = [
            (r.keys, [(d.raw, d.token) for d in held.values()]) for r, held in zip(runners, sent, strict=True)
        ]
        losses = await scripts.renew_all(
            self.app.redis(), renewals, lease_ms=int(self.settings.lease_ttl * 1000)
        )
        for r, held, lost in zip(runners, sent, losses, strict=True):
            cancelled = []
            for raw in lost:
                # The delivery whose token was sent: the job may have been claimed again meanwhile, and that
                # newer delivery (another token) must not be cancelled for its predecessor's lost lease.
                lost_d = held.get(raw)
                # A delivery whose ack is on its way lost its token to that ack, not to another worker.
                if lost_d is not None and not lost_d.finishing:
                    cancelled.append(lost_d.id)
                    self._cancel(lost_d, "lost")
            if cancelled:
                log.warning(
                    "lease on %d job(s) of %s lost (expired or recovered; another worker may run them): "
                    "cancelled their handlers: %s",
                    len(cancelled),
                    r.queue.name,
                    ", ".join(cancelled[:10]),
                )

    async def _check_loop(self, r: QueueRunner) -> None:
        interval = self.settings.check_interval
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                await self.check_stalled(r.queue)
            except QflowError as exc:
                log.warning("stalled-job check on %s failed: %s", r.queue.name, exc)
            except Exception:
                # Recovery must outlive any single bad round: log it and try again next interval.
                log.exception("stalled-job check on %s raised", r.queue.name)
            await asyncio.sleep(interval)

    async def check_stalled(self, queue: Queue) -> list[str]:
        """Run the stalled-job recovery for ``queue`` once; returns the ids it recovered or failed."""
        ret = queue.retention
        s = self.settings
        stalled_error = _codec.encode_error(
            _codec.ErrorInfo(
                type="Stalled",
                message=f"job stalled more than max_stalls={s.max_stalls} times "
                "(its worker died or stopped renewing its lease)",
                kind="stalled",
            )
        )
        res = await scripts.recover(
            self.app.redis(),
            queue.keys,
            checker=self.id,
            lock_ms=max(1, int(s.check_interval * 800)),
            max_stalls=s.max_stalls,
            stalled_error=stalled_error,
            keep_count=ret.failed_count,
            keep_age_ms=-1 if ret.failed_age is None else int(ret.failed_age * 1000),
        )
        if res is None:
            return []
        ids = [x.decode("utf-8", "surrogateescape") for x in res.ids]
        if ids:
            log.warning(
                "recovered %d stalled job(s) on %s (%d failed as stalled)",
                res.requeued,
                queue.name,
                res.failed,
            )
        return ids

    # -- stopping ----------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        runners = self._runners
        # 1. Jobs claimed ahead that have not started go back at once, so other workers run them meanwhile.
        for r in runners:
            unstarted = [d for lanes in r.lanes.values() for d in lanes.ready]
            for lanes in r.lanes.values():
                lanes.ready.clear()
            to_release = [d for d in unstarted if d.cancel_reason in (None, "release")]
            for d in to_release:
                d.cancel_reason = "release"
            if to_release:
                await self._release(r, to_release)
            for d in unstarted:
                if r.in_flight.get(d.id) is d:
                    del r.in_flight[d.id]
                r.free_slot(d)
        # 2. Running handlers may finish, up to the drain timeout.
        tasks = [t for r in runners for t in r.tasks]
        if tasks and not self._fast:
            running = sum(1 for r in runners for d in r.in_flight.values() if d.task is not None)
            log.info("draining %d in-flight job(s), up to %.1fs", running, self.settings.drain_timeout)
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout)
        # 3. Handlers still running are cancelled and their jobs released.
        self._cancel_unfinished()
        leftover = [t for r in runners for t in r.tasks]
        if leftover:
            pending = await cancel_until_done(leftover, timeout=_RELEASE_GRACE)
            if pending:
                log.warning("%d handler(s) ignored cancellation; releasing their jobs anyway", len(pending))
        # 4. Completions on their way land before the worker lets go of their jobs.
        for r in runners:
            if r.pending_acks:
                r.ack_event.set()
        acks = [
            d.ack for r in runners for d in r.in_flight.values() if d.ack is not None and not d.ack.done()
        ]
        if acks:
            await asyncio.wait(acks, timeout=self.settings.lease_ttl)
        for r in runners:
            to_release = [d for d in r.in_flight.values() if d.cancel_reason == "release"]
            if to_release:
                await self._release(r, to_release)
            r.in_flight.clear()

    async def _release(self, r: QueueRunner, deliveries: list[Delivery]) -> None:
        release = functools.partial(
            scripts.release, self.app.redis(), r.keys, [(d.raw, d.token) for d in deliveries]
        )
        try:
            flags: list[bool] = await self._with_retries(release)
        except BrokerUnavailable as exc:
            log.error(
                "could not release %d job(s) on %s (%s): they return when their leases expire",
                len(deliveries),
                r.queue.name,
                exc,
            )
            return
        log.info("released %d unfinished job(s) on %s back to waiting", sum(flags), r.queue.name)


class _HandlerTimeout(Exception):
    """The handler ran past its timeout (internal; recorded as a TimeoutError)."""
