"""Fetching: a fetcher per queue claims jobs in batches sized by free slots; idle, it waits on the server.

The claim script moves ids from ``wait`` into ``active`` under this worker's lease, so a job id is never only
in this process's memory. With nothing to claim, the fetcher blocks on the queue's wake-ups (``BZPOPMIN`` on
``marker``: each wake-up wakes one idle fetcher, and carries no job), then claims; with ``claim_behind_wait``
a one-job claim is queued behind the wait on the same connection, so an idle worker's pickup costs one round
trip. Each claimed job goes to the lanes.

Due times (issue 14): of all idle fetchers of a queue, the one whose last claim made it the queue's *timer
holder* (``next_due_ms >= 0``) ends its wait at the earliest delayed job's due time with ``CLIENT UNBLOCK``
(the server's own timeout is up to 100 ms late); the others wait ``block_timeout``. A delayed job that
becomes the earliest wakes one idle fetcher, which takes the role; a holder whose slots fill up, or that
stops, hands it on. See ``qflow._broker.claims`` and ``lua/_lib.lua``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .. import _codec
from .._broker import commands, scripts
from .._broker.errors import ErrorReply, translated
from ..exceptions import BrokerAuthError, QflowError
from .aio import wait_first
from .deliveries import CancelReason, Delivery
from .drain import release

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .deliveries import QueueRunner
    from .lanes import Lanes
    from .shared import Shared

__all__ = ("Fetcher", "backoff_delay")

log = logging.getLogger("qflow._worker")


def backoff_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failed claims in a row: 0.2, 0.4, 0.8, 1.6, then 2 at most."""
    return min(0.1 * 2.0 ** min(failures, 5), 2.0)


class Fetcher:
    """The fetchers of one worker (``run`` per queue), and the blocking waits a stop or a due time ends."""

    def __init__(self, shared: Shared, lanes: Lanes) -> None:
        self.shared = shared
        self.lanes = lanes
        self.unblockable = True
        """Idle waits go out with their ``CLIENT ID``, so ``CLIENT UNBLOCK`` ends them (a stop, a due time);
        off for good once the server refuses ``CLIENT ID`` (an ACL): waits are then cancelled instead, which
        drops their connection, and no claim goes behind them."""
        self._parked: dict[QueueRunner, int] = {}  # fetchers blocked on the server: their client ids
        self._woken: set[QueueRunner] = set()  # fetchers whose wait must end as soon as it is parked
        self._holding: set[QueueRunner] = set()  # fetchers whose last claim made them their queue's holder
        self._unblocks: set[asyncio.Task[Any]] = set()
        self._probed = False
        app = shared.app
        settings = shared.settings
        # The longest idle wait: it must end well inside the socket timeout, which detects a dead server.
        self._max_wait = min(settings.block_timeout, app.socket_timeout * 0.8)
        self._claim_kw: dict[str, Any] = {
            "lease_ms": int(settings.lease_ttl * 1000),
            # The envelope adds the name and options to the payload: allow a margin over max_payload_bytes.
            "max_envelope": app.max_payload_bytes + 64 * 1024,
            "hold_ms": max(1, int(self._max_wait * 1000)),
        }
        self._claim_kw["too_large"] = _codec.encode_error(
            _codec.ErrorInfo(
                type="PayloadTooLarge",
                message=f"stored job is over {self._claim_kw['max_envelope']:,} bytes (max_payload_bytes "
                f"{app.max_payload_bytes:,} + 64 KiB of envelope); it was written around add()",
                kind="payload",
            )
        )

    def _kw(self, r: QueueRunner) -> dict[str, Any]:
        """The claim's keywords for ``r``'s fetcher: its id is the worker's (unique: host, pid, random bits)
        and the queue's name; the queue's failed retention, which trims what the claim fails or expires."""
        ret = r.queue.retention
        keep = (ret.failed_count, -1 if ret.failed_age is None else int(ret.failed_age * 1000))
        return {**self._claim_kw, "fetcher": f"{self.shared.id}/{r.queue.name}", "keep_failed": keep}

    async def run(self, r: QueueRunner) -> None:
        """Claim jobs of one queue and hand them to the lanes until the worker stops (or, burst, drains)."""
        shared = self.shared
        stop = shared.stop
        assert stop is not None
        settings = shared.settings
        client = shared.redis()
        k = r.keys
        gate = self.lanes.gate
        kw = self._kw(r)
        budget = None if shared.max_jobs is None else shared.job_budget
        failures = 0
        behind: scripts.ClaimReply | None = None  # the reply of the claim behind the idle wait, delivered
        await self._probe()
        while not stop.is_set():
            if behind is not None:
                res, behind = behind, None
            else:
                if gate.suspect is not None:
                    # A job recovered after a crash runs alone in this process: claim nothing till it is done.
                    await self._hand_off(r)
                    await wait_first(gate.opened.wait(), stop.wait())
                    continue
                n = await r.slots.take(settings.claim_batch, stop, budget, r.queued)
                if n == 0:
                    break
                if gate.suspect is not None:
                    r.slots.give(n)
                    continue
                gate.busy += 1
                try:
                    res = await scripts.claim(client, k, count=n, spare=r.slots.free(), **kw)
                except Exception as exc:  # whatever a claim raises, the fetcher carries on
                    r.slots.give(n)
                    self._claim_ended()
                    failures += 1
                    await self._back_off(r, "claim", exc, failures)
                    continue
                failures = 0
                self._held(r, res)
                await self._deliver(r, n, res.jobs)
            next_due_ms, waiting, jobs = res
            if waiting or next_due_ms == 0:
                continue
            # Nothing left to claim: block until a wake-up (an empty claim round trip first would be wasted).
            if shared.burst and not jobs and await self._drained(r):
                break
            due_in = None if next_due_ms < 0 else next_due_ms / 1000
            # A free slot first, waited for here and not on the server: a wake-up taken by a fetcher that
            # cannot take a job would be lost to the idle ones (it is not handed on).
            n = await r.slots.take(1, stop, budget)
            if n == 0:
                break
            if gate.suspect is not None:
                r.slots.give(n)
                continue
            if shared.burst or not (settings.claim_behind_wait and self.unblockable):
                r.slots.give(n)
                await self._wait(r, due_in)
                continue
            # One job: an idle worker that freezes or loses its network while parked holds at most that one
            # (until its lease expires); the claims that follow take the rest in batches.
            gate.busy += 1
            behind, error = await self._wait_then_claim(r, due_in, n, kw)
            if behind is None:
                r.slots.give(n)
                self._claim_ended()
            else:
                await self._deliver(r, n, behind.jobs)
            if error is not None:
                failures += 1
                await self._back_off(r, error[0], error[1], failures)
            elif behind is not None:
                failures = 0
        await self._hand_off(r)

    def _held(self, r: QueueRunner, res: scripts.ClaimReply) -> None:
        """Note whether ``r``'s fetcher holds its queue's timer after the claim that answered ``res``."""
        if res.next_due_ms >= 0:
            self._holding.add(r)
        else:
            self._holding.discard(r)

    async def _hand_off(self, r: QueueRunner) -> None:
        """If ``r``'s fetcher holds its queue's timer, hand it on before it stops waiting idle (a stop, a
        suspect held): a claim of nothing that says no slot is free wakes another idle fetcher to take it."""
        if r not in self._holding:
            return
        self._holding.discard(r)
        try:
            await scripts.claim(self.shared.redis(), r.keys, count=0, spare=0, **self._kw(r))
        except Exception as exc:  # the role then passes on when it expires
            log.warning("could not hand on the due-time timer of %s (%s)", r.queue.name, exc)

    async def _deliver(self, r: QueueRunner, n: int, jobs: list[scripts.Claimed]) -> None:
        """Hand the jobs of a claim that took ``n`` slots to the lanes; return the slots left unused.

        A job recovered after a crash (``stalls > 0``) becomes the worker's suspect if none is held (it runs
        alone, see ``SuspectGate``). A claim that brings a suspect, or comes back while one is held, keeps
        nothing else: every other job it brought (fresh ones too) is handed back to waiting, attempt unspent,
        before any of them starts, so that none of them is claimed here if a job of this process kills it
        (the suspect, or a fresh job of the same claim that has not killed anyone yet). The claim's ``busy``
        count ends here, after the hand-back: the suspect starts after it.
        """
        gate = self.lanes.gate
        try:
            back: list[Delivery] | None = None
            if gate.suspect is not None:
                back = [Delivery(job) for job in jobs]
            elif not any(job.stalls for job in jobs):
                start = self.lanes.start
                for job in jobs:
                    start(r, Delivery(job))
            else:
                back = []
                for job in jobs:
                    if job.stalls and gate.suspect is None:
                        self.lanes.hold(r, Delivery(job))  # leased and renewed; starts once busy is 0
                        self.unpark()  # other fetchers' claims behind their waits come back now
                    else:
                        back.append(Delivery(job))
            kept = len(jobs) - (len(back) if back else 0)
            if kept < n:
                r.slots.give(n - kept)
            if back:
                for d in back:
                    d.cancel(CancelReason.RELEASE)
                log.info(
                    "handing back %d job(s) of %s: a job recovered after a crash runs alone here first",
                    len(back),
                    r.queue.name,
                )
                await release(self.shared, r, back)
        finally:
            self._claim_ended()

    def _claim_ended(self) -> None:
        """A claim (and the hand-back of what it brought) is over: a suspect held may start now."""
        gate = self.lanes.gate
        gate.busy -= 1
        if gate.suspect is not None:
            self.lanes.try_suspect()

    async def _back_off(self, r: QueueRunner, what: str, exc: Exception, failures: int) -> None:
        """Log a failed claim (WARNING: the queue and the error) and wait before the next one.

        The delay doubles from 0.2 s with each failure in a row, up to 2 s; a stop ends it at once. An error
        the server answered (a script that failed on corrupt data, say) or a broker error is logged in one
        line; anything else with its traceback, as it is a bug. A refused credential or permission
        (``BrokerAuthError``) is raised instead: retrying cannot help, and the worker exits with it.
        """
        if isinstance(exc, BrokerAuthError):
            raise exc
        stop = self.shared.stop
        assert stop is not None
        delay = backoff_delay(failures)
        expected = isinstance(exc, (QflowError, ErrorReply))
        log.warning(
            "%s on %s failed (%s: %s); retrying in %.1fs",
            what,
            r.queue.name,
            type(exc).__name__,
            exc,
            delay,
            exc_info=None if expected else exc,
        )
        await wait_first(stop.wait(), asyncio.sleep(delay))

    async def _wait(self, r: QueueRunner, due_in: float | None) -> None:
        """Block on the server until a wake-up, the due time ``due_in`` (seconds; the holder's) or a stop."""
        shared = self.shared
        stop = shared.stop
        assert stop is not None
        if self.unblockable:

            def wait(parked: Callable[[int], None], timeout: float) -> Awaitable[scripts.Parked]:
                return scripts.wait_parked(shared.redis(), r.keys, timeout=timeout, parked=parked)

            out = await self._parked_call(r, due_in, wait)
            if out.refused is not None:
                self._refused(out.refused)
            error = out.wait_error or out.failed
            if error is not None:
                log.warning("blocking wait on %s failed (%s)", r.queue.name, error)
                await wait_first(stop.wait(), asyncio.sleep(0.2))
            return
        # CLIENT ID refused: nothing can end the wait early but cancelling it (which drops its connection).
        waits: list[Awaitable[Any]] = [
            commands.wait_for_wakeup(shared.redis(), r.keys.marker, self._max_wait),
            stop.wait(),
        ]
        if due_in is not None and due_in < self._max_wait:
            waits.append(asyncio.sleep(due_in))
        if shared.burst and r.in_flight:
            waits.append(r.idle.wait())
        try:
            await wait_first(*waits)
        except Exception as exc:  # a failed wait must not end the fetcher
            log.warning("blocking wait on %s failed (%s)", r.queue.name, exc)
            await wait_first(stop.wait(), asyncio.sleep(0.2))

    async def _wait_then_claim(
        self, r: QueueRunner, due_in: float | None, n: int, kw: dict[str, Any]
    ) -> tuple[scripts.ClaimReply | None, tuple[str, Exception] | None]:
        """Block until a wake-up or the due time ``due_in``, with a claim of ``n`` queued behind the blocking
        call, on one connection.

        The server runs the claim the moment the wait ends, so an idle worker's pickup costs one round trip
        instead of two (see ``scripts.wait_then_claim``). The claim is still the one script that moves ids
        into ``active`` under a lease. ``stop()`` never abandons this call (a claim that ran would leave its
        jobs to lease expiry): it ends the wait with ``CLIENT UNBLOCK``, and jobs claimed after a stop are
        released at once. Returns the claim reply, or None (stopped, or the claim failed), and what failed
        (for the caller's back-off: nothing is logged here). Where ``CLIENT ID`` is not allowed (ACLs), the
        worker falls back to waiting, then claiming.
        """
        shared = self.shared
        stop = shared.stop
        assert stop is not None

        def wait(parked: Callable[[int], None], timeout: float) -> Awaitable[scripts.Parked]:
            return scripts.wait_then_claim(
                shared.redis(), r.keys, timeout=timeout, parked=parked, count=n, spare=r.slots.free(), **kw
            )

        try:
            out = await self._parked_call(r, due_in, wait)
        except Exception as exc:  # a reply it could not read, say: never end the fetcher
            return None, ("blocking wait and claim", exc)
        if out.refused is not None:
            self._refused(out.refused)
        if out.wait_error is not None:
            log.warning("blocking wait on %s failed (%s)", r.queue.name, out.wait_error)
        if out.failed is not None:
            return None, ("blocking wait and claim", out.failed)
        if out.claim_error is not None:
            return None, ("claim", out.claim_error)
        res = out.reply
        if res is not None:
            self._held(r, res)
            if stop.is_set():
                claimed = [Delivery(job) for job in res.jobs]
                for d in claimed:
                    d.cancel(CancelReason.RELEASE)
                if claimed:
                    await release(shared, r, claimed)
                return None, None
        return res, None

    async def _parked_call(
        self,
        r: QueueRunner,
        due_in: float | None,
        call: Callable[[Callable[[int], None], float], Awaitable[scripts.Parked]],
    ) -> scripts.Parked:
        """Run ``call(parked, timeout)``, a blocking wait that reports its client id through ``parked``, and
        end it with ``CLIENT UNBLOCK`` at the due time ``due_in`` (seconds, the holder's), at a stop, when a
        suspect is held, or (burst) when the queue's last job here finishes."""
        shared = self.shared
        stop = shared.stop
        assert stop is not None
        loop = asyncio.get_running_loop()
        timeout = self._max_wait
        timer = None
        if due_in is not None and due_in < timeout:
            # The server's timeout is a fallback: it is checked `hz` times a second, up to 100 ms late.
            timeout = due_in
            timer = loop.call_later(due_in, self._wake, r)
        watcher = None
        if shared.burst and r.in_flight:
            watcher = loop.create_task(r.idle.wait())
            watcher.add_done_callback(lambda t: None if t.cancelled() else self._wake(r))

        def parked(client_id: int) -> None:
            self._parked[r] = client_id
            if stop.is_set() or self.lanes.gate.suspect is not None:
                self.unpark()
            elif r in self._woken:
                self._unblock(r)

        try:
            return await call(parked, timeout)
        finally:
            self._parked.pop(r, None)
            self._woken.discard(r)
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _probe(self) -> None:
        """Once per worker: may this user send ``CLIENT ID``? If not, no wait is parked: one that could not
        be ended by a stop or a due time would keep either waiting up to block_timeout."""
        if self._probed:
            return
        self._probed = True
        try:
            await commands.command(self.shared.redis(), "CLIENT", "ID")
        except ErrorReply as exc:
            self._refused(exc)
        except Exception:  # unreachable: the first claim says so, and the first wait finds out
            pass

    def _refused(self, exc: Exception) -> None:
        if self.unblockable:
            self.unblockable = False
            log.info("CLIENT ID refused (%s): an idle worker waits, then claims (two round trips)", exc)

    def _wake(self, r: QueueRunner) -> None:
        """End ``r``'s fetcher's blocking wait now, or as soon as it is on the server."""
        self._woken.add(r)
        if r in self._parked:
            self._unblock(r)

    def _unblock(self, r: QueueRunner) -> None:
        client_id = self._parked.pop(r)
        task = asyncio.get_running_loop().create_task(
            commands.unblock(self.shared.redis(), client_id), name="qflow-unblock"
        )
        self._unblocks.add(task)
        task.add_done_callback(self._unblock_done)

    def unpark(self) -> None:
        """End the server-side waits of every parked fetcher (at a stop, or when a suspect is held)."""
        for r in list(self._parked):
            self._unblock(r)

    def _unblock_done(self, task: asyncio.Task[Any]) -> None:
        self._unblocks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The wait then ends by its own timeout (at most block_timeout).
            log.warning("could not end a fetcher's blocking wait: %s", task.exception())

    async def _drained(self, r: QueueRunner) -> bool:
        """Burst mode: True when this queue has nothing waiting, delayed or active (and nothing here)."""
        if r.in_flight:
            return False
        k = r.keys
        try:
            with translated("the drained check"):
                async with self.shared.redis().pipeline(transaction=True) as pipe:
                    pipe.llen(k.wait)
                    pipe.zcard(k.delayed)
                    pipe.zcard(k.active)
                    counts = await pipe.execute()
        except (QflowError, ErrorReply) as exc:
            log.warning("the drained check on %s failed (%s)", r.queue.name, exc)
            return False
        return not any(counts)
