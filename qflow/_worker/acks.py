"""Recording outcomes: completions in batches by a per-queue acker, failures and retries one by one.

A completion does not wait for Redis: the lane queues it and moves on to its next job, and the *acker* of
the queue sends everything that piled up while the previous batch was in flight as one script call. A
failure or a retry is rarer and is awaited by its lane. Each call carries the delivery's fencing token:
Redis refuses an ack from a delivery whose lease expired and was recovered (a *stale* ack, counted here).

An ack whose reply is lost (the connection dropped after Redis ran the script) is sent again by
``with_retries``. For a completion or a failure that is safe: Redis keeps the token of the delivery that
finished a job, and answers the resend of that very delivery as recorded (not stale, nothing written twice),
so the worker counts the outcome once and logs no rejection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import _codec
from .._broker import scripts
from ..exceptions import BrokerUnavailable, PayloadError
from .deliveries import ACKING, RUNNING

if TYPE_CHECKING:
    from .._processor import Processor
    from .deliveries import Delivery, QueueRunner
    from .shared import Shared

__all__ = ("Acker", "with_retries")

log = logging.getLogger("qflow._worker")

_BATCH = 200  # completions per script call


class Acker:
    """Sends this worker's outcomes: ``complete``, ``fail``, ``retry``; ``run`` is the acker of a queue."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.closed = False
        """Set once the worker stopped: an outcome that arrives later is not sent (its lease expires)."""

    def may_ack(self, d: Delivery) -> bool:
        """False for a delivery released or lost while its handler ignored the cancel, or after the worker
        stopped: its outcome is not ours to record (the job is back in Redis or owned by another delivery)."""
        return d.state is RUNNING and not self.closed

    async def complete(self, r: QueueRunner, d: Delivery, proc: Processor[Any, Any], result: Any) -> None:
        """Queue the completion for the acker without waiting: ``_acked`` finishes the delivery when it lands.

        Only the rare unencodable result awaits (its failure is recorded before the lane moves on).
        """
        if d.state is not RUNNING or self.closed:  # not self.may_ack(d), inlined: once per job
            return
        try:
            data = _codec.encode_payload(
                result,
                limit=self.shared.app.max_payload_bytes,
                what=f"result of {r.queue.name}:{proc.name}",
            )
        except PayloadError as exc:
            await self.fail(r, d, _codec.ErrorInfo.from_exception(exc, "result"), spent=True)
            return
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        d.move(ACKING)
        d.ack = fut
        r.free_slot(d)
        r.pending_acks.append((d, data, fut))
        r.ack_event.set()
        fut.add_done_callback(functools.partial(self._acked, r, d))

    def _acked(self, r: QueueRunner, d: Delivery, fut: asyncio.Future[bool]) -> None:
        shared = self.shared
        if not fut.cancelled() and fut.result():
            shared.jobs_done += 1
        shared.finish(r, d, True)

    async def fail(self, r: QueueRunner, d: Delivery, info: _codec.ErrorInfo, *, spent: bool = True) -> None:
        """Record a job as failed for good. Every such failure is logged here, in one form, whatever
        its kind (a handler's error, a timeout, a bad payload, an unknown name, an unencodable result)."""
        if not self.may_ack(d):
            return
        log.warning(
            "job %s:%s failed after %d attempt(s): %s: %s",
            r.queue.name,
            d.id,
            d.attempts + 1,
            info.type,
            info.message,
        )
        shared = self.shared
        ret = r.queue.retention
        keep_age = -1 if ret.failed_age is None else int(ret.failed_age * 1000)
        fail = functools.partial(
            scripts.fail,
            shared.redis(),
            r.keys,
            d.raw,
            d.token,
            _codec.encode_error(info),
            spent=spent,
            keep_count=ret.failed_count,
            keep_age_ms=keep_age,
            notify_ttl_ms=max(60_000, keep_age),
        )
        d.move(ACKING)
        r.free_slot(d)
        ok = await with_retries(fail, shared.settings.lease_ttl)
        if ok:
            shared.jobs_failed += 1
        else:
            self.stale(r, d, "fail")

    async def retry(self, r: QueueRunner, d: Delivery, delay: float, info: _codec.ErrorInfo) -> None:
        """Record a failed attempt and schedule the next one in ``delay`` seconds."""
        if not self.may_ack(d):
            return
        shared = self.shared
        retry = functools.partial(
            scripts.retry,
            shared.redis(),
            r.keys,
            d.raw,
            d.token,
            delay_ms=int(delay * 1000),
            error=_codec.encode_error(info),
        )
        d.move(ACKING)
        r.free_slot(d)
        ok = await with_retries(retry, shared.settings.lease_ttl)
        if ok:
            shared.jobs_retried += 1
        else:
            self.stale(r, d, "retry")

    async def run(self, r: QueueRunner) -> None:
        """The acker of one queue: send the completions queued since the last batch, as one script call."""
        client = self.shared.redis()
        lease_ttl = self.shared.settings.lease_ttl
        ret = r.queue.retention
        keep_age = -1 if ret.completed_age is None else int(ret.completed_age * 1000)
        notify_ttl = max(60_000, keep_age)
        while True:
            await r.ack_event.wait()
            r.ack_event.clear()
            batch, r.pending_acks = r.pending_acks, []
            for start in range(0, len(batch), _BATCH):
                part = batch[start : start + _BATCH]
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
                    flags: list[bool] = await with_retries(done, lease_ttl)
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
                        self.stale(r, d, "complete")
                    if not fut.done():
                        fut.set_result(ok)

    def close(self, runners: list[QueueRunner]) -> None:
        """At the end of a stop: send nothing more; completions still queued are dropped (leases expire)."""
        self.closed = True
        for r in runners:
            for _, _, fut in r.pending_acks:
                if not fut.done():
                    fut.set_result(False)
            r.pending_acks.clear()

    def stale(self, r: QueueRunner, d: Delivery, what: str) -> None:
        """Count and log an ack Redis refused: the delivery's lease had expired and its job was recovered."""
        self.shared.stale_acks += 1
        log.warning(
            "%s of job %s:%s rejected: its lease expired and the job was recovered "
            "(it may run again elsewhere)",
            what,
            r.queue.name,
            d.id,
        )


async def with_retries(call: Callable[[], Awaitable[Any]], lease_ttl: float) -> Any:
    """Retry an ack while Redis is unreachable, up to one lease TTL (after which it would be rejected).

    The first try may have run on the server with its reply lost: a resent complete or fail is then
    answered as recorded (see the module's docstring), a resent retry or release as stale.
    """
    deadline = asyncio.get_running_loop().time() + lease_ttl
    delay = 0.05
    while True:
        try:
            return await call()
        except BrokerUnavailable:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
