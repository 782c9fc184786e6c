"""Stopping: the drain after the fetchers ended, and handing unfinished jobs back to waiting.

A graceful stop (DESIGN.md, guarantee 5) stops fetching, lets running handlers finish up to the drain timeout
while the renewer still extends their leases, then releases what is left at once without spending an
attempt. A fast stop (``stop(fast=True)``, a second signal) cancels every handler that has not finished.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from .._broker import scripts
from .acks import with_retries
from .aio import cancel_until_done
from .deliveries import DONE, LOST, RELEASED, RELEASING, CancelReason

if TYPE_CHECKING:
    from .deliveries import Delivery, QueueRunner
    from .shared import Shared

__all__ = ("cancel_unfinished", "drain", "release")

log = logging.getLogger("qflow._worker")

_RELEASE_GRACE = 1.0  # seconds a cancelled handler gets to unwind before its job is released anyway


async def drain(shared: Shared) -> None:
    """After the fetchers ended: finish or release every delivery this worker holds."""
    runners = shared.runners
    # 1. Jobs claimed ahead that have not started go back at once, so other workers run them meanwhile; so
    #    does a job recovered after a crash that waits to run alone (the suspect, not started yet).
    for r in runners:
        unstarted = [d for lanes in r.lanes.values() for d in lanes.ready]
        for lanes in r.lanes.values():
            lanes.ready.clear()
        gate = r.gate
        if gate.runner is r and gate.suspect is not None and not gate.started:
            unstarted.append(gate.suspect)
            gate.open()
        to_release = [d for d in unstarted if d.state is not LOST]
        for d in to_release:
            d.cancel(CancelReason.RELEASE)
        if to_release:
            await release(shared, r, to_release)
        for d in unstarted:
            if d.state is LOST:
                d.move(DONE)
            r.forget(d)
    # 2. Running handlers may finish, up to the drain timeout.
    tasks = [t for r in runners for t in r.tasks]
    if tasks and not shared.fast:
        running = sum(1 for r in runners for d in r.in_flight.values() if d.task is not None)
        log.info("draining %d in-flight job(s), up to %.1fs", running, shared.settings.drain_timeout)
        await asyncio.wait(tasks, timeout=shared.settings.drain_timeout)
    # 3. Handlers still running are cancelled and their jobs released.
    cancel_unfinished(shared)
    leftover = [t for r in runners for t in r.tasks]
    if leftover:
        pending = await cancel_until_done(leftover, timeout=_RELEASE_GRACE)
        if pending:
            log.warning("%d handler(s) ignored cancellation; releasing their jobs anyway", len(pending))
    # 4. Completions on their way land before the worker lets go of their jobs.
    for r in runners:
        if r.pending_acks:
            r.ack_event.set()
    acks = [d.ack for r in runners for d in r.in_flight.values() if d.ack is not None and not d.ack.done()]
    if acks:
        await asyncio.wait(acks, timeout=shared.settings.lease_ttl)
    for r in runners:
        to_release = [d for d in r.in_flight.values() if d.state is RELEASING]
        if to_release:
            await release(shared, r, to_release)
        r.in_flight.clear()


def cancel_unfinished(shared: Shared) -> None:
    """Release every job whose handler has not finished (a fast stop); acks on their way still land."""
    for r in shared.runners:
        for d in list(r.in_flight.values()):
            d.cancel(CancelReason.RELEASE)


async def release(shared: Shared, r: QueueRunner, deliveries: list[Delivery]) -> None:
    """Hand RELEASING deliveries' jobs back to waiting (attempt unspent); they end RELEASED either way.

    If Redis stays unreachable (or the script fails), the jobs return when their leases expire.
    """
    call = functools.partial(scripts.release, shared.redis(), r.keys, [(d.raw, d.token) for d in deliveries])
    try:
        flags: list[bool] = await with_retries(call, shared.settings.lease_ttl)
    except Exception as exc:  # unreachable, or a script error: never end the fetcher or the drain
        log.error(
            "could not release %d job(s) on %s (%s: %s): they return when their leases expire",
            len(deliveries),
            r.queue.name,
            type(exc).__name__,
            exc,
        )
        return
    finally:
        for d in deliveries:
            if d.state is RELEASING:
                d.move(RELEASED)
    log.info("released %d unfinished job(s) on %s back to waiting", sum(flags), r.queue.name)
