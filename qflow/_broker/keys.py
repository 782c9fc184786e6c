"""The whole Redis key schema, in one place.

Every key of one queue carries the queue name as a Redis Cluster hash tag (``qflow:{email}:wait``), so each
Lua script touches a single slot. Scripts receive every key through ``KEYS``; no script builds a key name.

Per-job data lives in per-queue hashes keyed by job id (``jobs``, ``state``, ``tokens``, ...) rather than in
one hash per job: that keeps every key a script touches known before the script runs, including when a
script trims old jobs or recovers stalled ones whose ids it only discovers while running.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SCHEMA_VERSION = 1
"""Stored in each queue's ``meta`` hash; bumped when the layout below changes incompatibly."""

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-:]{1,128}$")


def check_queue_name(name: str) -> str:
    """Return ``name`` if it can be used as a queue name (and hash tag), else raise ``ValueError``."""
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ValueError(
            f"invalid queue name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . - : "
            "(braces are reserved for the Redis Cluster hash tag)"
        )
    return name


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Names of every Redis key that belongs to one queue, computed once (read on every script call)."""

    prefix: str
    queue: str

    wait: str = field(init=False, repr=False, compare=False)
    """List of waiting job ids; producers LPUSH, workers take from the right."""
    active: str = field(init=False, repr=False, compare=False)
    """Sorted set: job id -> lease deadline (ms, server clock)."""
    delayed: str = field(init=False, repr=False, compare=False)
    """Sorted set: job id -> time it becomes runnable (ms, server clock)."""
    completed: str = field(init=False, repr=False, compare=False)
    """Sorted set: job id -> completion time (ms); trimmed by count and age."""
    failed: str = field(init=False, repr=False, compare=False)
    """Sorted set: job id -> failure time (ms); trimmed by count and age."""
    expired: str = field(init=False, repr=False, compare=False)
    """Sorted set: job id -> time the claim found it expired (ms); trimmed by the failed retention."""
    expires: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> start deadline (ms, server clock) of a job added with ``expires=``: written by ``add``,
    read by the claim, deleted when the job is first leased, expired or trimmed (issue 14)."""
    jobs: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> encoded envelope (name, payload, options); written once by ``add``."""
    state: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> state name (see ``qflow._state.State``)."""
    tokens: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> fencing token of the current delivery while active; once complete or fail finished the
    job, the token of the delivery that did (a resent ack of it is recognised), until the job is trimmed."""
    attempts: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> attempts spent (handler runs that ended in an error)."""
    stalls: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> times the job was recovered from a dead or silent worker."""
    results: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> encoded return value of a completed job."""
    errors: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> encoded last error (type, message, traceback)."""
    waiters: str = field(init=False, repr=False, compare=False)
    """Hash: job id -> 1 while some client waits for the job's result."""
    seq: str = field(init=False, repr=False, compare=False)
    """Counter that hands out fencing tokens."""
    stats: str = field(init=False, repr=False, compare=False)
    """Hash of counters: completed, failed, retried, stalled, stale_acks, released, requeued."""
    checker: str = field(init=False, repr=False, compare=False)
    """Lock that lets one stalled-job checker act per interval across all workers."""
    meta: str = field(init=False, repr=False, compare=False)
    """Hash holding the schema version."""
    marker: str = field(init=False, repr=False, compare=False)
    """Sorted set of wake-ups that idle fetchers block on (``BZPOPMIN``: each wake-up wakes one of them).

    Member ``now`` (score 0): jobs are waiting. Member ``due`` (score: the due time, ms, server clock): a
    delayed job became the earliest and no idle fetcher times its wait to it yet. Two members at most; every
    script that pushes to ``wait`` or makes a job due earlier than before writes it (issue 14)."""
    timer: str = field(init=False, repr=False, compare=False)
    """String: the fetcher id of the one idle fetcher that times its wait to the earliest delayed job; set by
    the claim, for that fetcher's wait plus one more, so a dead holder's role passes on (issue 14)."""
    _notify: str = field(init=False, repr=False, compare=False)
    _notify_raw: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = f"{self.prefix}:{{{self.queue}}}:"
        for name in _FIXED:
            object.__setattr__(self, name, base + name)
        object.__setattr__(self, "_notify", f"{base}notify:")
        object.__setattr__(self, "_notify_raw", f"{base}notify:".encode())

    def notify(self, job_id: str) -> str:
        """List a finishing script pushes to when someone waits for ``job_id``'s result."""
        return self._notify + job_id

    def dedup(self, key: str | bytes) -> str | bytes:
        """String key holding the id of the job a deduplication ``key`` names, with its own TTL (PX) (issue
        14). Bytes in, bytes out (a key is encoded when it is checked)."""
        if isinstance(key, bytes):
            return self._notify_raw[: -len(b"notify:")] + b"dedup:" + key
        return self._notify[: -len("notify:")] + "dedup:" + key

    def notify_raw(self, job_id: bytes) -> bytes:
        """``notify`` for an id as the exact bytes a claim returned (a raw write can make one not UTF-8)."""
        return self._notify_raw + job_id

    def all_fixed(self) -> tuple[str, ...]:
        """Every key of the queue except the per-job ``notify`` lists (for purging and tests)."""
        return tuple(getattr(self, name) for name in _FIXED)


_FIXED = (
    "wait",
    "active",
    "delayed",
    "completed",
    "failed",
    "expired",
    "expires",
    "jobs",
    "state",
    "tokens",
    "attempts",
    "stalls",
    "results",
    "errors",
    "waiters",
    "seq",
    "stats",
    "checker",
    "meta",
    "marker",
    "timer",
)
"""The fixed keys of a queue: each is named ``<prefix>:{<queue>}:<name>``."""


# -- Fleet registry (issue #3) ---------------------------------------------------------------------------
# Fleet-wide keys, not per queue: worker processes register themselves here with a heartbeat so that
# `qflow status` can list every live worker on every host. No Lua script touches them (plain commands in one
# MULTI), so they do not follow the per-queue hash tag; they share their own tag, `{#fleet}`, which no queue
# name can spell ('#' is not allowed in queue names): fleet keys never collide with a queue's keys, and a
# MULTI over the registry and one worker's hash stays in one Cluster slot.


@dataclass(frozen=True, slots=True)
class FleetKeys:
    """Names of the fleet registry's keys (worker heartbeats)."""

    prefix: str

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> last heartbeat (ms, server clock).

        Every heartbeat (``qflow._fleet``) prunes members silent for longer than the heartbeat TTL; readers
        also drop members whose hash has expired.
        """
        return f"{self.prefix}:{{#fleet}}:workers"

    def worker(self, worker_id: str) -> str:
        """Hash describing one worker process (host, pid, queues, counters); expires unless renewed."""
        return f"{self.prefix}:{{#fleet}}:worker:{worker_id}"


# -- Repeatable jobs (issue 14) ---------------------------------------------------------------------------
# A queue's schedules live beside its jobs, under the queue's hash tag, so `fire.lua` creates a job and moves
# the schedule's cursor in one slot and one atomic step. Per-schedule data sits in per-queue hashes keyed by
# schedule id, as per-job data does. Only the wake-up stream is fleet-wide: one key every worker process can
# block on, whatever its queues (it carries no state, only "re-read the schedules").


@dataclass(frozen=True, slots=True)
class ScheduleKeys:
    """Names of the keys holding one queue's schedules (cron and interval jobs)."""

    prefix: str
    queue: str

    @property
    def schedules(self) -> str:
        """Hash: schedule id -> encoded spec (``qflow._schedule.ScheduleSpec``), as last upserted."""
        return f"{self.prefix}:{{{self.queue}}}:schedules"

    @property
    def schedule_next(self) -> str:
        """Sorted set: schedule id -> the next tick to fire (ms, server clock): the cursor ``fire`` moves."""
        return f"{self.prefix}:{{{self.queue}}}:schedule_next"

    @property
    def schedule_state(self) -> str:
        """Hash of per-schedule fields, each named ``<field>:<schedule id>``: ``ver`` (bumped by every change
        of the spec), ``env`` (the envelope of the job each tick creates), ``last`` (tick last fired, ms),
        ``fired`` (jobs created), ``missed`` (ticks that got no job: misfire policy)."""
        return f"{self.prefix}:{{{self.queue}}}:schedule_state"

    @property
    def events(self) -> str:
        """Stream (capped) of schedule changes, fleet-wide: idle schedulers block on it to wake at once."""
        return f"{self.prefix}:{{#fleet}}:schedule_events"
