"""One typed function per Lua script in ``lua/``: the only place that knows a script's KEYS and ARGV order
and the shape of its reply.

Each script file starts with its KEYS / ARGV / returns contract; ``KEYS`` below gives the keys of each script
in that order (tests/unit/test_broker.py holds the two together). Loading and calling a script by its SHA,
with the one NOSCRIPT fallback, is ``evalsha.Script``'s job. The claim and the idle fetcher's blocking wait
on the queue's wake-ups live in ``claims``; the scripts off the hot path (recovery, result waits, an
operator's retries) in ``scripts_admin``. Their functions are re-exported here, so callers import one module.

The hot path (claim, complete) does no work per job beyond reading the arguments and the reply; ids, tokens
and envelopes travel as the exact bytes Redis returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from . import evalsha
from .claims import KEYS as CLAIM_KEYS
from .claims import SCRIPTS as CLAIM_SCRIPTS
from .claims import (
    Claimed,
    ClaimReply,
    Parked,
    claim,
    parse_claim,
    unpack_claimed,
    wait_parked,
    wait_then_claim,
)
from .errors import translated
from .evalsha import Script, load_source
from .keys import SCHEMA_VERSION, QueueKeys
from .scripts_admin import KEYS as ADMIN_KEYS
from .scripts_admin import SCRIPTS as ADMIN_SCRIPTS
from .scripts_admin import (
    OldestRequeued,
    Recovered,
    Requeue,
    Watched,
    notify_key,
    recover,
    retry_failed,
    retry_oldest_failed,
    watch,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = (
    "DEDUP_OUTCOMES",
    "KEYS",
    "NOTIFY_TTL_MAX_MS",
    "SCRIPTS",
    "SCRIPT_NAMES",
    "ClaimReply",
    "Claimed",
    "NewJob",
    "OldestRequeued",
    "Parked",
    "Recovered",
    "Requeue",
    "Script",
    "Watched",
    "add",
    "add_dedup",
    "claim",
    "complete",
    "fail",
    "load_all",
    "load_source",
    "parse_claim",
    "recover",
    "release",
    "renew",
    "renew_all",
    "retry",
    "retry_failed",
    "retry_oldest_failed",
    "unpack_claimed",
    "wait_parked",
    "wait_then_claim",
    "watch",
)

JobId = str | bytes
"""A job id: the str a producer chose, or the exact bytes a claim returned (a raw write can make an id that
is not UTF-8; it goes back to Redis unchanged)."""
Token = str | bytes
"""A delivery's fencing token, as the claim returned it."""
Delivery = tuple[JobId, Token]
"""(job id, token) of one delivery."""

# -- the KEYS of each script, in the order of its header -----------------------------------------------------
# complete and fail also take the notify list of each job after these (KEYS[12..]).

KEYS: dict[str, Callable[[QueueKeys], tuple[str, ...]]] = {
    "add": lambda k: (k.jobs, k.state, k.wait, k.delayed, k.meta, k.marker, k.timer, k.expires),
    "dedup": lambda k: (k.jobs, k.state, k.wait, k.delayed, k.meta, k.marker, k.timer, k.expires),
    **CLAIM_KEYS,
    "complete": lambda k: (
        k.active, k.tokens, k.state, k.results, k.completed, k.jobs, k.attempts, k.stalls, k.errors,
        k.waiters, k.stats,
    ),
    "fail": lambda k: (
        k.active, k.tokens, k.state, k.errors, k.failed, k.jobs, k.attempts, k.stalls, k.results,
        k.waiters, k.stats,
    ),
    "retry": lambda k: (
        k.active, k.tokens, k.state, k.wait, k.delayed, k.attempts, k.errors, k.stats, k.marker, k.timer,
    ),
    "release": lambda k: (k.active, k.tokens, k.state, k.wait, k.stats, k.marker),
    "renew": lambda k: (k.active, k.tokens),
    **ADMIN_KEYS,
}  # fmt: skip
"""Script name -> the queue keys it takes as ``KEYS``, in order (those of ``scripts_admin`` included)."""

SCRIPT_NAMES = tuple(KEYS)


_ELSEWHERE = (*ADMIN_SCRIPTS, *CLAIM_SCRIPTS)
SCRIPTS = {
    **{name: Script(name, keys) for name, keys in KEYS.items() if name not in _ELSEWHERE},
    **CLAIM_SCRIPTS,
    **ADMIN_SCRIPTS,
}
"""Script name -> its ``Script``."""

_ADD = SCRIPTS["add"]
_DEDUP = SCRIPTS["dedup"]
_COMPLETE = SCRIPTS["complete"]
_FAIL = SCRIPTS["fail"]
_RETRY = SCRIPTS["retry"]
_RELEASE = SCRIPTS["release"]
_RENEW = SCRIPTS["renew"]


async def load_all(client: aioredis.Redis) -> None:
    """Load every script in one round trip, so the first call of each is not a NOSCRIPT miss."""
    await evalsha.load(client, SCRIPTS.values())


# -- add -----------------------------------------------------------------------------------------------------


class NewJob(msgspec.Struct, gc=False):
    """One job for ``add``: its id, its encoded envelope, and when it may run.

    A Struct without GC tracking: built once per enqueued job, it costs what a tuple does.
    """

    id: JobId
    envelope: bytes | str
    delay_ms: int = 0
    """Run this many ms after the add (server clock); 0: no delay."""
    run_at_ms: int = 0
    """Run at this Unix time in ms (server clock); 0: at once."""
    expires_in_ms: int = 0
    """Expire this many ms after the add unless started (server clock); 0: see ``expires_at_ms``."""
    expires_at_ms: int = 0
    """Expire at this Unix time in ms unless started; 0: never (with ``expires_in_ms`` 0)."""
    dedup_key: str | bytes = ""
    """A deduplication key (``add_dedup``); empty: none."""
    dedup_mode: str = ""
    """``throttle`` or ``debounce``, with ``dedup_key``."""
    dedup_ttl_ms: int = 0
    """How long ``dedup_key`` lives, ms."""


async def add(client: aioredis.Redis, keys: QueueKeys, jobs: Sequence[NewJob]) -> list[bool]:
    """Create ``jobs`` (``lua/add.lua``); per job, True if created, False if a job with its id exists.

    Raises ``SchemaMismatch`` when the queue was written by an incompatible qflow, ``BrokerFull`` at
    maxmemory (nothing written), ``BrokerUnavailable``.
    """
    if any(job.expires_in_ms or job.expires_at_ms for job in jobs):
        argv: list[Any] = [SCHEMA_VERSION, 6]
        for job in jobs:
            argv += (job.id, job.envelope, job.delay_ms, job.run_at_ms, job.expires_in_ms, job.expires_at_ms)
    else:
        argv = [SCHEMA_VERSION, 4]  # no expiry in this call: two fields fewer per job
        for job in jobs:
            argv += (job.id, job.envelope, job.delay_ms, job.run_at_ms)
    reply = await _ADD(client, _ADD.keys(keys), argv)
    return [created == 1 for created in reply]


DEDUP_OUTCOMES = ("exists", "created", "throttled", "debounced")
"""``add_dedup``'s outcome codes (0..3) as words (``qflow.AddOutcome`` values)."""


async def add_dedup(
    client: aioredis.Redis, keys: QueueKeys, jobs: Sequence[NewJob]
) -> list[tuple[str, bytes]]:
    """Add ``jobs``, each with a deduplication key, one after the other (``lua/dedup.lua``); per job, the
    outcome (one of ``DEDUP_OUTCOMES``) and the id of the job it names (the existing one when throttled or
    debounced). Raises as ``add`` does.
    """
    argv: list[Any] = [SCHEMA_VERSION]
    dedup_keys: list[str | bytes] = []
    index: dict[str | bytes, int] = {}
    base = len(_DEDUP.keys(keys)) + 1
    for job in jobs:
        at = index.get(job.dedup_key)
        if at is None:
            at = index[job.dedup_key] = base + len(dedup_keys)
            dedup_keys.append(keys.dedup(job.dedup_key))
        argv += (job.id, job.envelope, job.delay_ms, job.run_at_ms, job.expires_in_ms, job.expires_at_ms)
        argv += (job.dedup_mode, job.dedup_ttl_ms, at)
    reply = await _DEDUP(client, (*_DEDUP.keys(keys), *dedup_keys), argv)
    return [(DEDUP_OUTCOMES[int(reply[i])], reply[i + 1]) for i in range(0, len(reply), 2)]


# -- acks ----------------------------------------------------------------------------------------------------

NOTIFY_TTL_MAX_MS = 60_000
"""The longest a result waiter's notify list lives. It only has to outlast the gap between a waiter's watch
and its blocking wait (a round trip); a waiter looks again at least every few seconds anyway. Kept as long as
retention (a day by default), the lists of awaited jobs piled up (issue 12 item 8)."""


async def complete(
    client: aioredis.Redis,
    keys: QueueKeys,
    jobs: Sequence[tuple[JobId, Token, bytes | str]],
    *,
    keep_count: int,
    keep_age_ms: int,
    notify_ttl_ms: int,
) -> list[bool]:
    """Record (id, token, encoded result) of each job (``lua/complete.lua``); per job, True if recorded,
    False for a stale delivery (counted in ``stats.stale_acks``).

    Completed jobs beyond ``keep_count`` or older than ``keep_age_ms`` (-1: no age limit) are trimmed; a
    result waiter's notify list lives ``notify_ttl_ms``, at most ``NOTIFY_TTL_MAX_MS``.
    """
    argv: list[Any] = [keep_count, keep_age_ms, min(notify_ttl_ms, NOTIFY_TTL_MAX_MS)]
    notify = []
    for job in jobs:
        argv += job
        notify.append(notify_key(keys, job[0]))
    flags: bytes = await _COMPLETE(client, (*_COMPLETE.keys(keys), *notify), argv)
    return [flag == 49 for flag in flags]  # one byte per job: ord("1")


async def fail(
    client: aioredis.Redis,
    keys: QueueKeys,
    job_id: JobId,
    token: Token,
    error: bytes,
    *,
    spent: bool,
    keep_count: int,
    keep_age_ms: int,
    notify_ttl_ms: int,
) -> bool:
    """Move a job to ``failed`` with ``error`` (``lua/fail.lua``), spending an attempt if ``spent``; False
    for a stale delivery (counted). Retention and notify as in ``complete``."""
    argv = [job_id, token, error, int(spent), keep_count, keep_age_ms, min(notify_ttl_ms, NOTIFY_TTL_MAX_MS)]
    return bool(await _FAIL(client, (*_FAIL.keys(keys), notify_key(keys, job_id)), argv))


async def retry(
    client: aioredis.Redis, keys: QueueKeys, job_id: JobId, token: Token, *, delay_ms: int, error: bytes
) -> bool:
    """Spend an attempt and schedule the job again, now (``delay_ms`` 0) or later (``lua/retry.lua``);
    ``error`` is the attempt's. False for a stale delivery (counted)."""
    return bool(await _RETRY(client, _RETRY.keys(keys), [job_id, token, delay_ms, error]))


async def release(client: aioredis.Redis, keys: QueueKeys, deliveries: Sequence[Delivery]) -> list[bool]:
    """Hand jobs back to the front of ``wait`` without spending an attempt (``lua/release.lua``); per
    delivery, False if it was stale (left alone, counted)."""
    argv: list[Any] = []
    for delivery in deliveries:
        argv += delivery
    return [flag == 1 for flag in await _RELEASE(client, _RELEASE.keys(keys), argv)]


# -- leases --------------------------------------------------------------------------------------------------


def _renew_args(lease_ms: int, deliveries: Sequence[Delivery]) -> list[Any]:
    argv: list[Any] = [lease_ms]
    for delivery in deliveries:
        argv += delivery
    return argv


async def renew(
    client: aioredis.Redis, keys: QueueKeys, deliveries: Sequence[Delivery], *, lease_ms: int
) -> list[bytes]:
    """Extend the leases of ``deliveries`` to ``lease_ms`` from now (``lua/renew.lua``); returns the ids whose
    lease was lost (expired, recovered, or taken by another delivery)."""
    return list(await _RENEW(client, _RENEW.keys(keys), _renew_args(lease_ms, deliveries)))


async def renew_all(
    client: aioredis.Redis, queues: Sequence[tuple[QueueKeys, Sequence[Delivery]]], *, lease_ms: int
) -> list[list[bytes]]:
    """``renew`` on several queues in one pipelined round trip; the lost ids of each queue, in order.

    A queue whose script the server lost costs one more round trip (its source is sent).
    """
    calls = [(_RENEW.keys(keys), _renew_args(lease_ms, deliveries)) for keys, deliveries in queues]
    with translated("lease renewal"):
        async with client.pipeline(transaction=False) as pipe:
            for keys, argv in calls:
                pipe.execute_command(*_RENEW.evalsha(keys, argv))
            replies = await pipe.execute(raise_on_error=False)
    return [
        list(await _RENEW.settle(client, keys, argv, reply))
        for (keys, argv), reply in zip(calls, replies, strict=True)
    ]
