"""One typed function per schedule script (issue 14): upsert, remove, read, fire; the only place that knows
their KEYS and ARGV order and the shape of their replies.

A schedule's keys are named in ``keys.ScheduleKeys``; ``fire`` also takes the queue's own keys, since it
creates a job exactly as ``add.lua`` does. The scripts load on first use (``evalsha.Script``'s NOSCRIPT
fallback sends the source once); they are off the hot path: a change of a schedule, and one ``fire`` per
tick per worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple

from .commands import command
from .errors import translated
from .evalsha import Script
from .keys import SCHEMA_VERSION, QueueKeys, ScheduleKeys

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = (
    "EVENTS_MAXLEN",
    "KEYS",
    "SCRIPTS",
    "Fired",
    "Outcome",
    "StoredSchedule",
    "Upserted",
    "fire",
    "last_event",
    "read",
    "remove",
    "upsert",
    "wait_event",
)


def _sched(k: QueueKeys) -> ScheduleKeys:
    return ScheduleKeys(k.prefix, k.queue)


KEYS: dict[str, Callable[[QueueKeys], tuple[str, ...]]] = {
    "fire": lambda k: (
        k.jobs, k.state, k.wait, k.meta, _sched(k).schedule_next, _sched(k).schedule_state, k.marker,
    ),
    "schedule_upsert": lambda k: (
        _sched(k).schedules, _sched(k).schedule_next, _sched(k).schedule_state, k.meta,
    ),
    "schedule_remove": lambda k: (_sched(k).schedules, _sched(k).schedule_next, _sched(k).schedule_state),
    "schedule_read": lambda k: (_sched(k).schedules, _sched(k).schedule_next, _sched(k).schedule_state),
}  # fmt: skip
"""Script name -> the keys it takes as ``KEYS``, in the order of its header."""

SCRIPTS = {name: Script(name, keys) for name, keys in KEYS.items()}
"""Script name -> its ``Script``."""

_FIRE = SCRIPTS["fire"]
_UPSERT = SCRIPTS["schedule_upsert"]
_REMOVE = SCRIPTS["schedule_remove"]
_READ = SCRIPTS["schedule_read"]

EVENTS_MAXLEN = 100
"""Entries the fleet-wide schedule event stream keeps (approximately): it only says "re-read", so a reader
that fell further behind than this still sees that something happened."""


class Upserted(NamedTuple):
    """What ``upsert`` did."""

    changed: bool
    """False when the same spec and envelope were stored already: nothing was written."""
    version: int
    cursor: int | None
    """The next tick (ms); None for a schedule that has no more ticks."""


async def upsert(
    client: aioredis.Redis, keys: QueueKeys, schedule_id: str, spec: bytes, envelope: bytes, first_ms: int
) -> Upserted:
    """Store a schedule (``lua/schedule_upsert.lua``); on a change, tell every scheduler (``events``)."""
    changed, version, cursor = await _UPSERT(
        client, _UPSERT.keys(keys), [SCHEMA_VERSION, schedule_id, spec, envelope, first_ms]
    )
    if changed:
        await _announce(client, keys, schedule_id, "upsert")
    return Upserted(bool(changed), int(version), None if cursor is None else int(float(cursor)))


async def remove(client: aioredis.Redis, keys: QueueKeys, schedule_id: str) -> bool:
    """Delete a schedule (``lua/schedule_remove.lua``); True if it existed."""
    existed = bool(await _REMOVE(client, _REMOVE.keys(keys), [schedule_id]))
    if existed:
        await _announce(client, keys, schedule_id, "remove")
    return existed


async def _announce(client: aioredis.Redis, keys: QueueKeys, schedule_id: str, what: str) -> None:
    # After the script, not in it: the stream is fleet-wide (another hash tag). Lost if this process dies in
    # between; schedulers also re-read on their own every RELOAD_EVERY seconds (qflow._worker.scheduler).
    events = ScheduleKeys(keys.prefix, keys.queue).events
    with translated("XADD schedule events"):
        await command(
            client, "XADD", events, "MAXLEN", "~", EVENTS_MAXLEN, "*", "q", keys.queue, "id", schedule_id,
            "op", what,
        )  # fmt: skip


class StoredSchedule(NamedTuple):
    """One schedule as ``schedule_read.lua`` returns it (raw: the caller decodes the spec)."""

    id: str
    spec: bytes
    version: int
    cursor: int | None
    last: int | None
    fired: int
    missed: int
    envelope: bytes | None


async def read(
    client: aioredis.Redis, keys: QueueKeys, *, with_envelopes: bool = False
) -> tuple[int, list[StoredSchedule]]:
    """The server's time (ms) and every schedule of the queue (``lua/schedule_read.lua``), one instant."""
    reply = await _READ(client, _READ.keys(keys), [int(with_envelopes)])
    now, rest = int(reply[0]), reply[1:]
    out = []
    for i in range(0, len(rest), 8):
        sid, spec, version, cursor, last, fired, missed, env = rest[i : i + 8]
        out.append(
            StoredSchedule(
                id=sid.decode("utf-8", "surrogateescape"),
                spec=spec,
                version=_int(version),
                cursor=None if cursor is None else int(float(cursor)),
                last=None if last is None else _int(last),
                fired=_int(fired),
                missed=_int(missed),
                envelope=env,
            )
        )
    return now, out


def _int(value: Any) -> int:
    """A stored counter; 0 when missing or not a number (a read-out never fails on one bad field)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class Outcome(IntEnum):
    """The kind of ``fire`` reply."""

    STALE = 0
    """The schedule changed or went, or another process fired this tick first: nothing written."""
    FIRED = 1
    """The tick was fired: its job created (unless the misfire policy dropped it), the cursor moved on."""
    EARLY = 2
    """The server's clock has not reached the tick yet: nothing written."""


class Fired(NamedTuple):
    """What ``fire`` did."""

    outcome: Outcome
    created: bool = False
    """FIRED: a job was created (False: the misfire policy dropped the tick, or its id existed)."""
    now: int = 0
    """FIRED: the server's time (ms) when it fired."""
    version: int | None = None
    """STALE: the schedule's version now (None: it was removed)."""
    cursor: int | None = None
    """STALE: the schedule's cursor now (None: removed, or no more ticks)."""
    wait_ms: int = 0
    """EARLY: how long until the tick, on the server's clock."""


async def fire(
    client: aioredis.Redis,
    keys: QueueKeys,
    schedule_id: str,
    *,
    version: int,
    cursor: int,
    tick: int,
    next_tick: int | None,
    skipped: int,
    grace_ms: int,
    job_id: str,
) -> Fired:
    """Create the job of ``tick`` and move the cursor from ``cursor`` to ``next_tick``, if the schedule is
    still at ``version`` and ``cursor`` (``lua/fire.lua``); ``grace_ms`` -1 creates it however late."""
    args = [SCHEMA_VERSION, schedule_id, version, cursor, tick, next_tick or 0, skipped, grace_ms, job_id]
    reply = await _FIRE(client, _FIRE.keys(keys), args)
    kind = Outcome(int(reply[0]))
    if kind is Outcome.FIRED:
        return Fired(kind, created=bool(reply[1]), now=int(reply[2]))
    if kind is Outcome.EARLY:
        return Fired(kind, wait_ms=int(reply[1]))
    version_now = reply[1] if len(reply) > 1 else None
    cursor_now = reply[2] if len(reply) > 2 else None
    return Fired(
        kind,
        version=None if version_now is None else _int(version_now),
        cursor=None if cursor_now is None else int(float(cursor_now)),
    )


async def last_event(client: aioredis.Redis, events: str) -> bytes:
    """The id of the newest entry of the schedule event stream (``0-0`` when it is empty)."""
    with translated("XREVRANGE schedule events"):
        newest = await command(client, "XREVRANGE", events, "+", "-", "COUNT", 1)
    return bytes(newest[0][0]) if newest else b"0-0"


async def wait_event(client: aioredis.Redis, events: str, after: bytes, timeout: float) -> bytes | None:
    """Block until the schedule event stream has an entry after ``after``, or ``timeout`` seconds pass;
    return the newest entry's id, or None. ``timeout`` must be shorter than the socket timeout."""
    with translated("XREAD schedule events"):
        reply = await command(
            client, "XREAD", "COUNT", EVENTS_MAXLEN, "BLOCK", max(1, int(timeout * 1000)), "STREAMS", events,
            after,
        )  # fmt: skip
    if not reply:
        return None
    _stream, entries = reply[0]
    return bytes(entries[-1][0]) if entries else None
