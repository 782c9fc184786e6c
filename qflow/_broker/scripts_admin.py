"""The scripts off the hot path, one typed function each: recovery of expired leases, a result waiter's
watch, and an operator's retry of failed jobs. ``scripts`` re-exports them and merges ``KEYS`` and
``SCRIPTS`` into its own, so callers import ``scripts`` alone.

As in ``scripts``, this is the only place that knows these scripts' KEYS and ARGV order and the shape of
their replies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from .evalsha import Script
from .keys import QueueKeys

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = (
    "KEYS",
    "SCRIPTS",
    "OldestRequeued",
    "Recovered",
    "Requeue",
    "Watched",
    "notify_key",
    "recover",
    "retry_failed",
    "retry_oldest_failed",
    "watch",
)

KEYS: dict[str, Callable[[QueueKeys], tuple[str, ...]]] = {
    "recover": lambda k: (
        k.active, k.tokens, k.state, k.wait, k.failed, k.errors, k.stalls, k.checker, k.stats, k.jobs,
        k.results, k.attempts, k.waiters, k.marker,
    ),
    "watch": lambda k: (k.state, k.results, k.errors, k.waiters),
    "retry_failed": lambda k: (
        k.failed, k.state, k.wait, k.jobs, k.attempts, k.stalls, k.errors, k.stats, k.waiters, k.marker,
    ),
}  # fmt: skip
"""Script name -> the queue keys it takes as ``KEYS``, in order."""

SCRIPTS = {name: Script(name, keys) for name, keys in KEYS.items()}
"""Script name -> its ``Script``."""

_RECOVER = SCRIPTS["recover"]
_WATCH = SCRIPTS["watch"]
_RETRY_FAILED = SCRIPTS["retry_failed"]


def notify_key(keys: QueueKeys, job_id: str | bytes) -> str | bytes:
    """The notify list of ``job_id`` (str as a producer chose it, or the raw bytes a claim returned)."""
    return keys.notify_raw(job_id) if isinstance(job_id, bytes) else keys.notify(job_id)


# -- recovery ------------------------------------------------------------------------------------------------


class Recovered(NamedTuple):
    """What one ``recover`` did."""

    requeued: int
    """Jobs put back in ``wait``."""
    failed: int
    """Jobs failed as stalled (recovered more than ``max_stalls`` times)."""
    ids: list[bytes]
    """The ids of both, in the order they were handled."""


async def recover(
    client: aioredis.Redis,
    keys: QueueKeys,
    *,
    checker: str,
    lock_ms: int,
    max_stalls: int,
    stalled_error: bytes | str,
    keep_count: int,
    keep_age_ms: int,
    limit: int = 1000,
) -> Recovered | None:
    """Give up to ``limit`` expired leases back to ``wait``, or fail them with ``stalled_error`` once they
    stalled more than ``max_stalls`` times (``lua/recover.lua``). One checker acts per ``lock_ms`` across all
    workers: None when another holds the interval. Failed jobs are trimmed as in ``fail``."""
    argv = [checker, lock_ms, max_stalls, stalled_error, keep_count, keep_age_ms, limit]
    reply = await _RECOVER(client, _RECOVER.keys(keys), argv)
    if int(reply[0]) < 0:
        return None
    return Recovered(int(reply[0]), int(reply[1]), list(reply[2:]))


# -- results and operators -----------------------------------------------------------------------------------


class Watched(NamedTuple):
    """A job's state and outcome, as ``watch`` read them."""

    state: str | None
    """The stored state; None when there is no such job."""
    data: bytes | None
    """The encoded result (completed) or error (failed); None otherwise."""


async def watch(client: aioredis.Redis, keys: QueueKeys, job_id: str) -> Watched:
    """Read a job's state and outcome; if it is not finished, register a waiter so the script that finishes it
    pushes to ``keys.notify(job_id)`` (``lua/watch.lua``): no gap for a missed wake-up. What an earlier life
    of the id left in that list is deleted then, so a blocking wait on it does not end at once."""
    state, data = await _WATCH(client, (*_WATCH.keys(keys), keys.notify(job_id)), [job_id])
    return Watched(None if state is None else state.decode("utf-8", "replace"), data)


class Requeue(IntEnum):
    """What ``retry_failed`` did with one id."""

    REQUEUED = 1
    NOT_FAILED = 0
    """The job is not failed (retried already, or running): left alone."""
    MISSING = -1
    """No such job (never added, or trimmed by retention)."""


async def retry_failed(client: aioredis.Redis, keys: QueueKeys, job_ids: Sequence[str]) -> list[Requeue]:
    """Put these failed jobs back in ``wait`` with fresh attempts (``lua/retry_failed.lua``, "ids" mode)."""
    reply = await _RETRY_FAILED(client, _RETRY_FAILED.keys(keys), ["ids", *job_ids])
    return [Requeue(int(flag)) for flag in reply]


class OldestRequeued(NamedTuple):
    """What ``retry_oldest_failed`` did."""

    requeued: int
    left: int
    """Failed jobs still in the queue's failed set."""


async def retry_oldest_failed(client: aioredis.Redis, keys: QueueKeys, most: int) -> OldestRequeued:
    """Put up to ``most`` failed jobs back in ``wait``, oldest failures first (``lua/retry_failed.lua``,
    "oldest" mode). A failed-set entry without a failed job is dropped, so repeated calls end."""
    moved, left = await _RETRY_FAILED(client, _RETRY_FAILED.keys(keys), ["oldest", most])
    return OldestRequeued(int(moved), int(left))
