"""Job admin: look one job up, put failed jobs back, delete a whole queue.

The operations behind ``Queue.get_job``, ``Queue.retry_failed`` and ``Queue.purge`` (and so behind
``qflow jobs show|retry|purge``). Each state change is one atomic script or a plain delete of keys the queue
owns: a job is never seen half-moved, and nothing outside the queue's own keys is touched. Read-outs of a
fleet and its queues (workers, counts, job lists) are in ``qflow._inspect``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from . import _codec
from ._broker import scripts
from ._broker.errors import translated
from ._inspect import glob_escape
from ._settings import check_number
from ._state import State
from .exceptions import ConfigurationError, JobNotFound, PayloadError, SchemaMismatch

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = ("JobInfo", "RetryReport", "get_job", "purge", "retry_failed")

_RETRY_BATCH = 500
"""Jobs per ``retry_failed.lua`` call: bounds the time one script holds the server."""
_DELETE_BATCH = 500
"""Keys per ``DEL`` when ``purge`` deletes the notify lists it found by ``SCAN``."""


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Everything stored about one job, read at one instant (``Queue.get_job``).

    A snapshot: the job may move on the moment it is read. ``qflow jobs show --json`` prints these fields.
    """

    queue: str
    """Name of the job's queue."""
    id: str
    state: State
    name: str | None
    """The processor name it was added for (None if its stored record is missing)."""
    payload: Any
    """The payload as plain data (decoded without the processor's type); ``"<undecodable: ...>"`` if the
    stored bytes cannot be decoded."""
    attempts_spent: int
    """Handler runs that ended in an error (0 again after ``retry_failed``)."""
    stalls: int
    """Times the job was recovered from a dead or silent worker."""
    options: dict[str, Any]
    """Per-job overrides given at ``add`` (attempts, timeout, backoff)."""
    result: Any = None
    """The return value of a completed job (None also when there is none: see ``has_result``)."""
    has_result: bool = False
    """Whether a result is stored: a completed job that returned None has one, a failed job has none."""
    error: dict[str, str] | None = None
    """The last error, if any: ``type``, ``message``, ``traceback`` and ``kind`` (``error``, ``timeout``,
    ``stalled``, ``payload``, ``unknown_name`` or ``result``). Kept while a job waits for its next attempt."""
    since: float | None = None
    """Server time (Unix seconds) that goes with the state: when it completed or failed, when a delayed job
    is due, an active job's lease deadline; None while waiting."""


class RetryReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Queue.retry_failed`` did."""

    requeued: int
    """Failed jobs put back in ``waiting`` with a fresh set of attempts."""
    not_failed: list[str] = msgspec.field(default_factory=list)
    """Ids given that name a job in another state (retried already, running, completed...): left alone."""
    missing: list[str] = msgspec.field(default_factory=list)
    """Ids given that name no job (never added, or trimmed by retention)."""


async def get_job(queue: Queue, job_id: str) -> JobInfo:
    """Read everything stored about one job in one ``MULTI``; raise ``JobNotFound`` if there is none."""
    _check_id(job_id)
    k = queue.keys
    client = queue.app.redis()
    with translated("a job's record"):
        async with client.pipeline(transaction=True) as pipe:
            pipe.hget(k.state, job_id)
            pipe.hget(k.jobs, job_id)
            pipe.hget(k.attempts, job_id)
            pipe.hget(k.stalls, job_id)
            pipe.hget(k.results, job_id)
            pipe.hget(k.errors, job_id)
            for zset in (k.completed, k.failed, k.expired, k.delayed, k.active):
                pipe.zscore(zset, job_id)
            raw_state, env_raw, attempts, stalls, result, error, *scores = await pipe.execute()
    if raw_state is None:
        raise JobNotFound(f"no job {job_id!r} in queue {queue.name!r} (never added, or trimmed by retention)")
    text = raw_state.decode("utf-8", "backslashreplace") if isinstance(raw_state, bytes) else raw_state
    try:
        state = State(text)
    except ValueError:
        raise SchemaMismatch(
            f"job {job_id!r} in queue {queue.name!r} has the state {text!r}, which this qflow "
            "does not know: written by another version of qflow, or by hand"
        ) from None
    name: str | None = None
    payload: Any = None
    options: dict[str, Any] = {}
    if env_raw is not None:
        try:
            env = _codec.decode_envelope(env_raw)
            name = env.name
            payload = _codec.decode_any(bytes(env.payload))
            options = {
                key: value
                for key, value in msgspec.structs.asdict(env).items()
                if key not in ("name", "payload") and value is not None
            }
        except (PayloadError, *_codec.DECODE_ERRORS) as exc:
            payload = f"<undecodable: {exc}>"
    since = next((s for s in scores if s is not None), None)
    return JobInfo(
        queue=queue.name,
        id=job_id,
        state=state,
        name=name,
        payload=payload,
        attempts_spent=int(attempts or 0),
        stalls=int(stalls or 0),
        options=msgspec.to_builtins(options),
        result=_codec.decode_any(result) if result is not None else None,
        has_result=result is not None,
        error=msgspec.structs.asdict(_codec.decode_error(error)) if error is not None else None,
        since=None if since is None else since / 1000,
    )


async def retry_failed(
    queue: Queue, ids: Iterable[str] | None = None, *, limit: int | None = None
) -> RetryReport:
    """Put failed jobs back in ``wait`` with fresh attempts: those of ``ids``, else the ``limit`` oldest
    failures (``limit`` None: every failed job). See ``Queue.retry_failed``."""
    if ids is not None and limit is not None:
        raise ConfigurationError("give ids or limit=, not both (limit= picks the oldest failed jobs)")
    if limit is not None:
        # No upper bound is needed: the scripts get min(limit - done, 500), never limit itself.
        check_number("limit", limit, ge=1, integer=True, unit="or None: every failed job")
    if isinstance(ids, str | bytes):
        raise ConfigurationError(f"ids must be a list of job ids, got one string: {ids!r} (use [{ids!r}])")
    client = queue.app.redis()
    keys = queue.keys
    if ids is None:
        requeued = 0
        previous = -1
        while limit is None or requeued < limit:
            most = _RETRY_BATCH if limit is None else min(_RETRY_BATCH, limit - requeued)
            moved, left = await scripts.retry_oldest_failed(client, keys, most)
            requeued += moved
            if left == 0 or left == previous:
                break
            previous = left
        return RetryReport(requeued=requeued)
    wanted = list(ids)
    bad = next((i for i in wanted if not isinstance(i, str) or not i), None)
    if bad is not None:
        raise ConfigurationError(f"a job id must be a non-empty str, got {bad!r}")
    for job_id in wanted:
        _check_id(job_id)
    requeued = 0
    not_failed: list[str] = []
    missing: list[str] = []
    for start in range(0, len(wanted), _RETRY_BATCH):
        chunk = wanted[start : start + _RETRY_BATCH]
        for job_id, outcome in zip(chunk, await scripts.retry_failed(client, keys, chunk), strict=True):
            if outcome is scripts.Requeue.REQUEUED:
                requeued += 1
            elif outcome is scripts.Requeue.NOT_FAILED:
                not_failed.append(job_id)
            else:
                missing.append(job_id)
    return RetryReport(requeued=requeued, not_failed=not_failed, missing=missing)


async def purge(queue: Queue) -> int:
    """Delete every key of ``queue`` and nothing else; return how many keys were deleted.

    The fixed keys come from ``QueueKeys.all_fixed()``; the per-job notify lists are found with ``SCAN``
    (never ``KEYS``, which blocks the server) under a pattern whose prefix and queue name are escaped, so a
    prefix holding ``*`` or ``?`` cannot reach another queue's keys.
    """
    keys = queue.keys
    client = queue.app.redis()
    pattern = glob_escape(keys.notify("")) + "*"
    with translated("purging a queue"):
        deleted = int(await client.delete(*keys.all_fixed()))
        found: list[Any] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            found.append(key)
            if len(found) >= _DELETE_BATCH:
                deleted += int(await client.delete(*found))
                found.clear()
        if found:
            deleted += int(await client.delete(*found))
    return deleted


def _check_id(job_id: object) -> None:
    """Refuse a job id Redis cannot be sent: not a str, or a str with no UTF-8 form (a lone surrogate)."""
    if not isinstance(job_id, str):
        raise ConfigurationError(f"a job id must be a str, got {job_id!r}")
    try:
        job_id.encode()
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"job id {job_id!r} is not valid text: {exc.reason} at index {exc.start} (no UTF-8 form)"
        ) from None
