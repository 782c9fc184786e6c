"""Leases: renewing every lease this process holds, and recovering the jobs of workers that stopped renewing.

One *renewer* per worker extends every lease it holds, all queues in one pipelined round trip every third of
the lease TTL, and cancels the handlers of deliveries whose lease was lost. One *checker* per queue runs the
stalled-job recovery (a lock lets one checker act per interval, fleet-wide): a job whose lease expired goes
back to waiting, or fails as stalled after ``max_stalls``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from .. import _codec
from .._broker import scripts
from ..exceptions import QflowError
from .deliveries import CancelReason

if TYPE_CHECKING:
    from .._queue import Queue
    from .deliveries import QueueRunner
    from .shared import Shared

__all__ = ("Leases",)

log = logging.getLogger("qflow._worker")


class Leases:
    """Lease renewal for this worker's deliveries, and the stalled-job recovery of its queues."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    async def renew_loop(self) -> None:
        """Renew every third of the lease TTL; a failed round is logged and tried again next time."""
        interval = self.shared.settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew()
            except QflowError as exc:
                log.warning("lease renewal failed (%s); retrying in %.1fs", exc, interval)
            except Exception:
                log.exception("lease renewal raised; retrying in %.1fs", interval)

    async def renew(self) -> None:
        """Extend every lease this process holds: one pipelined round trip for all queues."""
        shared = self.shared
        runners = [r for r in shared.runners if r.in_flight]
        if not runners:
            return
        sent = [{d.raw: d for d in r.in_flight.values()} for r in runners]
        renewals = [
            (r.keys, [(d.raw, d.token) for d in held.values()]) for r, held in zip(runners, sent, strict=True)
        ]
        losses = await scripts.renew_all(
            shared.redis(), renewals, lease_ms=int(shared.settings.lease_ttl * 1000)
        )
        for r, held, lost in zip(runners, sent, losses, strict=True):
            cancelled = []
            for raw in lost:
                # The delivery whose token was sent: the job may have been claimed again meanwhile, and that
                # newer delivery (another token) must not be cancelled for its predecessor's lost lease.
                lost_d = held.get(raw)
                # A delivery whose ack is on its way lost its token to that ack, not to another worker:
                # cancel() leaves it alone.
                if lost_d is not None and lost_d.cancel(CancelReason.LOST):
                    cancelled.append(lost_d.id)
            if cancelled:
                log.warning(
                    "lease on %d job(s) of %s lost (expired or recovered; another worker may run them): "
                    "cancelled their handlers: %s",
                    len(cancelled),
                    r.queue.name,
                    ", ".join(cancelled[:10]),
                )

    async def check_loop(self, r: QueueRunner) -> None:
        """Run the stalled-job recovery of one queue every ``check_interval`` (first at a random offset)."""
        interval = self.shared.settings.check_interval
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
        shared = self.shared
        s = shared.settings
        stalled_error = _codec.encode_error(
            _codec.ErrorInfo(
                type="Stalled",
                message=f"job stalled more than max_stalls={s.max_stalls} times "
                "(its worker died or stopped renewing its lease)",
                kind="stalled",
            )
        )
        res = await scripts.recover(
            shared.redis(),
            queue.keys,
            checker=shared.id,
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
