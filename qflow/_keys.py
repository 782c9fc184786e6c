"""The whole Redis key schema, in one place.

Every key of one queue carries the queue name as a Redis Cluster hash tag (``qflow:{email}:wait``), so each
Lua script touches a single slot. Scripts receive every key through ``KEYS``; no script builds a key name.

Per-job data lives in per-queue hashes keyed by job id (``jobs``, ``state``, ``tokens``, ...) rather than in
one hash per job: that keeps every key a script touches known before the script runs, including when a
script trims old jobs or recovers stalled ones whose ids it only discovers while running.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    """Names of every Redis key that belongs to one queue."""

    prefix: str
    queue: str

    def _k(self, suffix: str) -> str:
        return f"{self.prefix}:{{{self.queue}}}:{suffix}"

    @property
    def wait(self) -> str:
        """List of waiting job ids; producers LPUSH, workers take from the right."""
        return self._k("wait")

    @property
    def active(self) -> str:
        """Sorted set: job id -> lease deadline (ms, server clock)."""
        return self._k("active")

    @property
    def delayed(self) -> str:
        """Sorted set: job id -> time it becomes runnable (ms, server clock)."""
        return self._k("delayed")

    @property
    def completed(self) -> str:
        """Sorted set: job id -> completion time (ms); trimmed by count and age."""
        return self._k("completed")

    @property
    def failed(self) -> str:
        """Sorted set: job id -> failure time (ms); trimmed by count and age."""
        return self._k("failed")

    @property
    def jobs(self) -> str:
        """Hash: job id -> encoded envelope (name, payload, options); written once by ``add``."""
        return self._k("jobs")

    @property
    def state(self) -> str:
        """Hash: job id -> state name (see ``qflow._state.State``)."""
        return self._k("state")

    @property
    def tokens(self) -> str:
        """Hash: job id -> fencing token of the current delivery (only while active)."""
        return self._k("tokens")

    @property
    def attempts(self) -> str:
        """Hash: job id -> attempts spent (handler runs that ended in an error)."""
        return self._k("attempts")

    @property
    def stalls(self) -> str:
        """Hash: job id -> times the job was recovered from a dead or silent worker."""
        return self._k("stalls")

    @property
    def results(self) -> str:
        """Hash: job id -> encoded return value of a completed job."""
        return self._k("results")

    @property
    def errors(self) -> str:
        """Hash: job id -> encoded last error (type, message, traceback)."""
        return self._k("errors")

    @property
    def waiters(self) -> str:
        """Hash: job id -> 1 while some client waits for the job's result."""
        return self._k("waiters")

    @property
    def seq(self) -> str:
        """Counter that hands out fencing tokens."""
        return self._k("seq")

    @property
    def stats(self) -> str:
        """Hash of counters: completed, failed, retried, stalled, stale_acks, released."""
        return self._k("stats")

    @property
    def checker(self) -> str:
        """Lock that lets one stalled-job checker act per interval across all workers."""
        return self._k("checker")

    @property
    def meta(self) -> str:
        """Hash holding the schema version."""
        return self._k("meta")

    def notify(self, job_id: str) -> str:
        """List a finishing script pushes to when someone waits for ``job_id``'s result."""
        return self._k(f"notify:{job_id}")

    def all_fixed(self) -> tuple[str, ...]:
        """Every key of the queue except the per-job ``notify`` lists (for purging and tests)."""
        return (
            self.wait,
            self.active,
            self.delayed,
            self.completed,
            self.failed,
            self.jobs,
            self.state,
            self.tokens,
            self.attempts,
            self.stalls,
            self.results,
            self.errors,
            self.waiters,
            self.seq,
            self.stats,
            self.checker,
            self.meta,
        )


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
        """Sorted set: worker id -> last heartbeat (ms, server clock); stale members are pruned by readers."""
        return f"{self.prefix}:{{#fleet}}:workers"

    def worker(self, worker_id: str) -> str:
        """Hash describing one worker process (host, pid, queues, counters); expires unless renewed."""
        return f"{self.prefix}:{{#fleet}}:worker:{worker_id}"
