"""The scheduler inside each worker process: fires the ticks of the schedules of the queues it runs.

No beat process and no leader. Every worker process running a queue keeps the queue's schedules in memory
(read with ``schedule_read.lua``), sleeps until the earliest next tick, and then calls ``fire.lua`` for it.
``fire`` is a compare-and-set on the schedule's cursor and version: the first call for a tick, from whichever
process on whichever host, creates the tick's job and moves the cursor to the next tick in one atomic step;
every other call finds the cursor moved and changes nothing (its reply carries the new cursor, so the loser
needs no extra read). So exactly one job per tick, however many processes race, crash or restart:

- a process killed before its ``fire`` ran changed nothing, and one killed after changed everything (the
  script is atomic); the others fired the tick at the same instant anyway;
- the dedup state is the schedule's own cursor in Redis, never the job (arq's ``cron(unique=True)`` relied
  on the job's keys and ran a tick twice once the first run had cleaned them up, python-arq/arq#196);
- the server's clock decides: ``fire`` refuses a tick the server has not reached, ticks are computed from
  the server's time (``TIME`` through ``schedule_read``, kept as an offset to the monotonic clock), never
  from the local wall clock;
- the job's id is derived from the schedule and the tick, so even a replay of the same call adds nothing.

Waiting costs no polling: between ticks the process sleeps on a local timer, and one ``XREAD BLOCK`` on the
fleet-wide schedule event stream (``ScheduleKeys.events``) wakes it when any process upserts or removes a
schedule. With no schedule at all, a worker process sends that one blocking read every 0.8 x socket timeout
(4 s by default) and re-reads its queues' schedules every ``RELOAD_EVERY`` seconds, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._broker import scripts_schedule
from .._broker.keys import ScheduleKeys
from .._broker.scripts_schedule import Outcome
from .._cron import Ticks, due
from .._schedule import Prepared, ScheduleSpec, decode_spec, job_id, upsert
from ..exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    PayloadError,
    QflowError,
)
from .aio import cancel_until_done

if TYPE_CHECKING:
    from .._queue import Queue
    from .shared import Shared

__all__ = ("RELOAD_EVERY", "Scheduler", "declarations")

log = logging.getLogger("qflow._worker")

RELOAD_EVERY = 60.0
"""Seconds between two reads of the schedules when no event came: the safety net for a change whose event
was lost (its process died between the upsert script and the ``XADD``, a refused ``XADD``)."""
BACKOFF_MAX = 5.0
"""Longest pause after a failed round (server unreachable...), doubling from 0.1 s."""
LOG_EVERY = 60.0
"""Seconds between two warnings about the same kind of failure."""


def declarations(queues: list[Queue]) -> list[tuple[Queue, Prepared]]:
    """The ``@queue.cron`` declarations of ``queues``, checked and encoded (a worker's start fails on a
    bad one, as it fails on a bad payload annotation)."""
    return [(q, decl.prepare(q)) for q in queues for decl in q.declared_schedules.values()]


@dataclass
class _Entry:
    """One schedule as this process knows it."""

    queue: Queue
    id: str
    spec: ScheduleSpec
    ticks: Ticks
    version: int
    cursor: int | None


class Scheduler:
    """Fires the schedules of ``queues`` from this worker process (see the module docstring)."""

    def __init__(self, shared: Shared, queues: list[Queue], declared: list[tuple[Queue, Prepared]]) -> None:
        self.shared = shared
        self.queues = queues
        self.declared = declared
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.offset_ms = 0.0
        """Server ms minus local monotonic ms, measured at each read and fire."""
        self.changed = asyncio.Event()
        self.fired = 0
        """Jobs this process created for ticks."""
        self.reloads = 0
        """Reads of the schedules this process made (at start, at each change, every ``RELOAD_EVERY``)."""
        self._unusable: set[tuple[str, str, int]] = set()
        self._warned: dict[str, float] = {}

    # -- clocks --------------------------------------------------------------------------------------------

    def server_now(self) -> int:
        """The server's time now (ms), estimated from the last measured offset."""
        return int(time.monotonic() * 1000 + self.offset_ms)

    def _measured(self, server_ms: int, sent: float, received: float) -> None:
        # The server read its clock somewhere inside the round trip: its middle is the best guess.
        self.offset_ms = server_ms - (sent + received) * 500

    # -- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Upsert the declarations, then fire due ticks until the worker stops (cancelled after its drain)."""
        shared = self.shared
        client = shared.redis()
        events = ScheduleKeys(shared.app.prefix, "").events
        backoff = 0.1
        while not shared.stopping:
            try:
                await self._upsert_declared()
                break
            except QflowError as exc:
                self._warn("start", "scheduler could not upsert the declared schedules (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        else:
            return
        try:
            after = await scripts_schedule.last_event(client, events)
        except BrokerError:
            after = b"0-0"  # the watcher reads what the stream holds: one needless re-read at most
        watcher = asyncio.create_task(self._watch(events, after), name="qflow-schedule-events")
        try:
            await self._loop()
        finally:
            await cancel_until_done([watcher])

    async def _loop(self) -> None:
        shared = self.shared
        dirty = True
        reloaded = 0.0
        backoff = 0.1
        while not shared.stopping:
            try:
                if dirty or time.monotonic() - reloaded >= RELOAD_EVERY:
                    self.changed.clear()
                    await self._reload()
                    reloaded = time.monotonic()
                    dirty = False
                due_at = min((e.cursor for e in self.entries.values() if e.cursor is not None), default=None)
                left = RELOAD_EVERY if due_at is None else (due_at - self.server_now()) / 1000
                if left > 0:
                    try:
                        await asyncio.wait_for(self.changed.wait(), min(left, RELOAD_EVERY))
                    except TimeoutError:
                        if left >= RELOAD_EVERY:
                            dirty = True
                            continue
                    else:
                        dirty = True  # an upsert or a removal somewhere: read the schedules again
                        continue
                if shared.stopping:
                    return  # a draining worker fires nothing more: the rest of the fleet does
                dirty = await self._fire_due()
                backoff = 0.1
            except QflowError as exc:
                if shared.stopping:
                    return
                self._warn(type(exc).__name__, "scheduler round failed (%s); retrying", exc)
            except Exception:
                # Like recovery, the scheduler must outlive any single bad round.
                log.exception("scheduler round raised; retrying")
            else:
                continue
            dirty = True
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _watch(self, events: str, after: bytes) -> None:
        """Block on the schedule event stream; on a new entry, wake the loop (it re-reads the schedules)."""
        client = self.shared.redis()
        block = min(0.8 * self.shared.app.socket_timeout, 30.0)
        pause = 1.0
        while True:
            try:
                newest = await scripts_schedule.wait_event(client, events, after, block)
            except BrokerAuthError as exc:
                log.warning(
                    "schedule changes made elsewhere reach this worker within %.0fs only (its periodic "
                    "re-read): reading %s was refused (%s); grant the worker's user read access to it",
                    RELOAD_EVERY,
                    events,
                    exc,
                )
                return
            except BrokerError as exc:
                if self.shared.stopping:
                    return  # the worker is stopping: its connections go (a cancellation can surface so)
                self._warn("watch", "waiting for schedule changes failed (%s); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                self.changed.set()  # the loop re-reads: a change may have gone unseen meanwhile
                continue
            pause = 1.0
            if newest is not None:
                after = newest
                self.changed.set()

    async def _upsert_declared(self) -> None:
        for queue, prepared in self.declared:
            try:
                await upsert(queue, prepared, client=self.shared.redis())
            except ConfigurationError as exc:
                log.error("schedule %s of queue %s not upserted: %s", prepared.id, queue.name, exc)

    async def _reload(self) -> None:
        """Read every schedule of the queues (one script call per queue) and the server's clock."""
        client = self.shared.redis()
        entries: dict[tuple[str, str], _Entry] = {}
        for queue in self.queues:
            sent = time.monotonic()
            now, stored = await scripts_schedule.read(client, queue.keys)
            self._measured(now, sent, time.monotonic())
            for s in stored:
                key = (queue.name, s.id)
                old = self.entries.get(key)
                if old is not None and old.version == s.version:
                    old.cursor = s.cursor
                    entries[key] = old
                    continue
                if (queue.name, s.id, s.version) in self._unusable:
                    continue
                try:
                    spec = decode_spec(s.spec)
                    ticks = spec.ticks()
                except (ConfigurationError, PayloadError) as exc:
                    self._unusable.add((queue.name, s.id, s.version))
                    log.error(
                        "schedule %s of queue %s (version %d) cannot be fired by this process: %s",
                        s.id,
                        queue.name,
                        s.version,
                        exc,
                    )
                    continue
                entries[key] = _Entry(queue, s.id, spec, ticks, s.version, s.cursor)
        self.entries = entries
        self.reloads += 1

    async def _fire_due(self) -> bool:
        """Fire every entry whose cursor the server's clock has reached; True if the schedules must be
        re-read (one changed under us)."""
        client = self.shared.redis()
        dirty = False
        failed: QflowError | None = None
        for key, e in list(self.entries.items()):
            if e.cursor is None or self.shared.stopping:
                continue
            now = self.server_now()
            d = due(e.ticks, e.cursor, now)
            if d is None:
                continue
            sent = time.monotonic()
            try:
                res = await scripts_schedule.fire(
                    client,
                    e.queue.keys,
                    e.id,
                    version=e.version,
                    cursor=e.cursor,
                    tick=d.tick,
                    next_tick=d.next,
                    skipped=d.skipped,
                    grace_ms=e.spec.grace,
                    job_id=job_id(e.id, d.tick),
                )
            except BrokerUnavailable:
                raise  # the server or the connection: the same for every schedule
            except QflowError as exc:
                # The other schedules still fire this round; the loop then backs off and reads again.
                failed = failed or exc
                continue
            if res.outcome is Outcome.FIRED:
                self._measured(res.now, sent, time.monotonic())
                e.cursor = d.next
                self.fired += res.created
                if d.skipped or not res.created:
                    lost = f"{'at least ' if d.capped else ''}{d.skipped} missed tick(s) before it got none"
                    log.warning(
                        "schedule %s of %s fired tick %d late (misfire=%s): %s; %s",
                        e.id,
                        e.queue.name,
                        d.tick,
                        e.spec.misfire,
                        "its job was created" if res.created else "no job for it either",
                        lost,
                    )
            elif res.outcome is Outcome.EARLY:
                # The server has not reached the tick: our clock estimate was ahead. Correct it and wait.
                self.offset_ms = d.tick - res.wait_ms - time.monotonic() * 1000
            elif res.version is None:
                del self.entries[key]  # removed
            elif res.version != e.version:
                dirty = True  # changed: read it again
            else:
                e.cursor = res.cursor  # another process fired this tick first
        if failed is not None:
            raise failed
        return dirty

    def _warn(self, kind: str, message: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._warned[kind] = now
            log.warning(message, exc)
        else:
            log.debug(message, exc)
