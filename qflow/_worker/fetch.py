"""Fetching: a fetcher per queue claims jobs in batches sized by free slots; idle, it waits on the server.

The claim script moves ids from ``wait`` into ``active`` under this worker's lease, so a job id is never only
in this process's memory. With nothing to claim, the fetcher blocks on the server (``BLMOVE wait wait``,
which wakes on a push without taking the job), by default with a claim of one job queued behind the wait on
the same connection, so an idle worker's pickup costs one round trip. Each claimed job goes to the lanes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from .. import _codec
from .._broker import commands, scripts
from .._broker.errors import ErrorReply, translated
from ..exceptions import BrokerAuthError, QflowError
from .aio import wait_first
from .deliveries import CancelReason, Delivery
from .drain import release

if TYPE_CHECKING:
    from .deliveries import QueueRunner
    from .lanes import Lanes
    from .shared import Shared

__all__ = ("Fetcher", "backoff_delay")

log = logging.getLogger("qflow._worker")


def backoff_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failed claims in a row: 0.2, 0.4, 0.8, 1.6, then 2 at most."""
    return min(0.1 * 2.0 ** min(failures, 5), 2.0)


class Fetcher:
    """The fetchers of one worker (``run`` per queue), and the blocking waits a stop must end."""

    def __init__(self, shared: Shared, lanes: Lanes) -> None:
        self.shared = shared
        self.lanes = lanes
        self.claim_behind = True
        """Queue a claim behind the idle wait (off for good once the server refuses ``CLIENT ID``)."""
        self._parked: dict[QueueRunner, int] = {}  # fetchers blocked in _wait_then_claim: their client ids
        self._unblocks: set[asyncio.Task[Any]] = set()
        app = shared.app
        self._lease_ms = int(shared.settings.lease_ttl * 1000)
        # The envelope adds the name and options to the payload: allow a margin over max_payload_bytes.
        self._max_envelope = app.max_payload_bytes + 64 * 1024
        self._too_large = _codec.encode_error(
            _codec.ErrorInfo(
                type="PayloadTooLarge",
                message=f"stored job is over {self._max_envelope:,} bytes (max_payload_bytes "
                f"{app.max_payload_bytes:,} + 64 KiB of envelope); it was written around add()",
                kind="payload",
            )
        )

    async def run(self, r: QueueRunner) -> None:
        """Claim jobs of one queue and hand them to the lanes until the worker stops (or, burst, drains)."""
        shared = self.shared
        stop = shared.stop
        assert stop is not None
        settings = shared.settings
        client = shared.redis()
        k = r.keys
        gate = self.lanes.gate
        lease_ms, max_envelope, too_large = self._lease_ms, self._max_envelope, self._too_large
        budget = None if shared.max_jobs is None else shared.job_budget
        failures = 0
        behind: scripts.ClaimReply | None = None  # the reply of the claim behind the idle wait, delivered
        while not stop.is_set():
            if behind is not None:
                res, behind = behind, None
            else:
                if gate.suspect is not None:
                    # A job recovered after a crash runs alone in this process: claim nothing till it is done.
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
                    res = await scripts.claim(
                        client, k, count=n, lease_ms=lease_ms, max_envelope=max_envelope, too_large=too_large
                    )
                except Exception as exc:  # whatever a claim raises, the fetcher carries on
                    r.slots.give(n)
                    self._claim_ended()
                    failures += 1
                    await self._back_off(r, "claim", exc, failures)
                    continue
                failures = 0
                await self._deliver(r, n, res.jobs)
            next_due_ms, waiting, jobs = res
            if waiting:
                continue
            # Nothing left to claim: block until a push (an empty claim round trip first would be wasted).
            if shared.burst and not jobs and await self._drained(r):
                break
            timeout = settings.block_timeout
            if next_due_ms >= 0:
                timeout = min(timeout, next_due_ms / 1000)
            if timeout <= 0:
                continue
            # The wait must end well inside the socket timeout, which is what detects a dead server.
            timeout = min(timeout, shared.app.socket_timeout * 0.8)
            if shared.burst or not (settings.claim_behind_wait and self.claim_behind):
                await self._wait_for_work(r, timeout)
                continue
            # One job: an idle worker that freezes or loses its network while parked holds at most that one
            # (until its lease expires); the claims that follow take the rest in batches.
            n = await r.slots.take(1, stop, budget)
            if n == 0:
                break
            if gate.suspect is not None:
                r.slots.give(n)
                continue
            gate.busy += 1
            behind, error = await self._wait_then_claim(r, timeout, n)
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

    async def _deliver(self, r: QueueRunner, n: int, jobs: list[scripts.Claimed]) -> None:
        """Hand the jobs of a claim that took ``n`` slots to the lanes; return the slots left unused.

        A job recovered after a crash (``stalls > 0``) becomes the worker's suspect if none is held (it runs
        alone, see ``SuspectGate``); other suspects, and every job of a claim that comes back while one is
        held, are handed back to waiting at once, attempt unspent, so that none of them is claimed here if
        the suspect kills the process. The claim's ``busy`` count ends here.
        """
        gate = self.lanes.gate
        try:
            back: list[Delivery] | None = None
            if gate.suspect is not None:
                back = [Delivery(job) for job in jobs]
            else:
                start = self.lanes.start
                for job in jobs:
                    if not job.stalls:
                        start(r, Delivery(job))
                    elif gate.suspect is None:
                        self.lanes.hold(r, Delivery(job))
                        self.unpark()  # other fetchers' claims behind their waits come back now
                    elif back is None:
                        back = [Delivery(job)]
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

    async def _wait_for_work(self, r: QueueRunner, timeout: float) -> None:
        """Block on the server until a job is pushed (``BLMOVE wait wait`` rotates, taking nothing)."""
        shared = self.shared
        stop = shared.stop
        assert stop is not None
        blocking = commands.wait_for_push(shared.redis(), r.keys.wait, timeout)
        waits: list[Awaitable[Any]] = [blocking, stop.wait()]
        if shared.burst and r.in_flight:
            waits.append(r.idle.wait())
        try:
            await wait_first(*waits)
        except Exception as exc:  # a failed wait must not end the fetcher
            # BrokerFull: OOM at maxmemory (BLMOVE is a deny-oom write); claims still work then.
            log.warning("blocking wait on %s failed (%s)", r.queue.name, exc)
            await wait_first(stop.wait(), asyncio.sleep(min(timeout, 0.2)))

    async def _wait_then_claim(
        self, r: QueueRunner, timeout: float, n: int
    ) -> tuple[scripts.ClaimReply | None, tuple[str, Exception] | None]:
        """Block until a push with a claim of ``n`` queued behind the blocking call, on one connection.

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

        def parked(client_id: int) -> None:
            self._parked[r] = client_id
            if stop.is_set() or self.lanes.gate.suspect is not None:
                self.unpark()

        try:
            out = await scripts.wait_then_claim(
                shared.redis(),
                r.keys,
                timeout=timeout,
                parked=parked,
                count=n,
                lease_ms=self._lease_ms,
                max_envelope=self._max_envelope,
                too_large=self._too_large,
            )
        except Exception as exc:  # a reply it could not read, say: never end the fetcher
            return None, ("blocking wait and claim", exc)
        finally:
            self._parked.pop(r, None)
        if out.refused is not None:
            self.claim_behind = False
            log.info(
                "CLIENT ID refused (%s): an idle worker waits, then claims (two round trips)", out.refused
            )
        if out.wait_error is not None:
            log.warning("blocking wait on %s failed (%s)", r.queue.name, out.wait_error)
        if out.failed is not None:
            return None, ("blocking wait and claim", out.failed)
        if out.claim_error is not None:
            return None, ("claim", out.claim_error)
        res = out.reply
        if res is not None and stop.is_set():
            claimed = [Delivery(job) for job in res.jobs]
            for d in claimed:
                d.cancel(CancelReason.RELEASE)
            if claimed:
                await release(shared, r, claimed)
            return None, None
        return res, None

    def unpark(self) -> None:
        """End the server-side waits of fetchers blocked in ``_wait_then_claim`` (at a stop)."""
        if not self._parked:
            return
        loop = asyncio.get_running_loop()
        for r, client_id in list(self._parked.items()):
            del self._parked[r]
            task = loop.create_task(commands.unblock(self.shared.redis(), client_id), name="qflow-unblock")
            self._unblocks.add(task)
            task.add_done_callback(self._unblock_done)

    def _unblock_done(self, task: asyncio.Task[Any]) -> None:
        self._unblocks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The wait then ends by its own timeout (at most block_timeout).
            log.warning("could not end a fetcher's blocking wait at stop: %s", task.exception())

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
