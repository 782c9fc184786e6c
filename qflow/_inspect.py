"""Read-outs of a fleet and its queues, for any process: live workers, queue counts and throughput, job lists.

Behind ``qflow status``, ``qflow info`` and ``qflow jobs list``. Nothing here writes a job or needs an ``App``
with processors: ``discover_queues`` finds the queues of a prefix from the workers' heartbeats (written by
``qflow._fleet``) and a ``SCAN`` of the key schema, so those commands work without ``module:app``. Every
read is bounded, and the reads of one queue go in one ``MULTI``, so they see it at one instant. Looking up
one job and the verbs that change jobs (retry, purge) are in ``qflow._admin``.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from ._broker import commands
from ._broker.errors import translated
from ._broker.keys import FleetKeys, QueueKeys, check_queue_name
from ._fleet import LOAD_DECODER, QueueLoad

if TYPE_CHECKING:
    from ._app import App
    from ._queue import Queue

__all__ = (
    "JOB_LIST_STATES",
    "THROUGHPUT_WINDOW",
    "JobList",
    "ListedJob",
    "QueueInfo",
    "WorkerInfo",
    "discover_queues",
    "glob_escape",
    "list_jobs",
    "list_workers",
    "queue_info",
    "server_time",
)

THROUGHPUT_WINDOW = 60.0
"""Seconds of recent history ``queue_info`` measures throughput over."""

_NO_LOAD = QueueLoad()


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One live worker process, as registered by its heartbeat."""

    id: str
    host: str
    pid: int
    supervisor_pid: int
    """Pid of the ``qflow worker`` supervisor that started it (0: started some other way)."""
    name: str
    target: str
    queues: dict[str, int]
    """Queue name -> jobs this process runs at once on it."""
    concurrency: int
    in_flight: int
    """Jobs this process holds: running, claimed ahead, or with their ack on its way."""
    jobs_done: int
    jobs_handled: int
    state: str
    """``running`` or ``draining``."""
    running: int = 0
    """Jobs whose handler runs now, all queues (at most ``concurrency``)."""
    claimed_ahead: int = 0
    """Jobs claimed ahead of a free lane, all queues: leased here, not started yet."""
    load: dict[str, QueueLoad] = msgspec.field(default_factory=dict)
    """Queue name -> running and claimed-ahead jobs on it."""
    started_at: float
    """Server time (Unix seconds) the worker registered."""
    last_seen: float
    """Server time (Unix seconds) of its last heartbeat."""


class QueueInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Counts and recent throughput of one queue."""

    queue: str
    waiting: int
    active: int
    """Jobs leased to workers (the ``active`` set): running, claimed ahead, or with their ack on its way."""
    delayed: int
    completed: int
    failed: int
    expired: int
    """Jobs kept (by the failed retention) that expired before any worker started them."""
    workers: int
    """Live worker processes consuming this queue."""
    concurrency: int
    """Jobs those workers can run at once on this queue, in total."""
    running: int
    """Jobs whose handler runs now, by the live workers' last heartbeats (at most ``concurrency``)."""
    claimed_ahead: int
    """Jobs those workers claimed ahead and that wait for a free lane, by their last heartbeats."""
    completed_per_s: float
    failed_per_s: float
    window_s: float
    """Seconds the two rates were measured over (at most ``THROUGHPUT_WINDOW``)."""
    totals: dict[str, int]
    """Lifetime counters: completed, failed, expired, retried, stalled, stale_acks, released, requeued."""


async def server_time(app: App) -> float:
    """Seconds (Unix time) on the Redis server's clock, the clock every stored time is on."""
    return await commands.server_ms(app.redis()) / 1000


# -- the fleet ----------------------------------------------------------------------------------------------


async def list_workers(app: App) -> list[WorkerInfo]:
    """Every worker process whose heartbeat is current, on every host, oldest first."""
    client = app.redis()
    keys = FleetKeys(app.prefix)
    with translated("the fleet registry"):
        members = typing.cast("list[bytes]", await client.zrange(keys.workers, 0, -1))
        ids = [_text(x) for x in members]
        if not ids:
            return []
        async with client.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(keys.worker(worker_id))
            hashes = await pipe.execute()
        gone = [worker_id for worker_id, h in zip(ids, hashes, strict=True) if not h]
        if gone:
            await client.zrem(keys.workers, *gone)
    out = [_worker_info(worker_id, h) for worker_id, h in zip(ids, hashes, strict=True) if h]
    return sorted(out, key=lambda w: (w.started_at, w.host, w.pid))


def _worker_info(worker_id: str, raw: dict[Any, Any]) -> WorkerInfo:
    h = {_text(k): _text(v) for k, v in raw.items()}

    def num(field: str) -> int:
        try:
            return int(h.get(field, "0"))
        except ValueError:
            return 0

    try:
        queues = msgspec.json.decode(h.get("queues", "{}"), type=dict[str, int])
    except msgspec.DecodeError:
        queues = {}
    try:
        load = LOAD_DECODER.decode(h.get("load", "{}"))
    except msgspec.DecodeError:
        load = {}
    return WorkerInfo(
        id=worker_id,
        host=h.get("host", "?"),
        pid=num("pid"),
        supervisor_pid=num("supervisor_pid"),
        name=h.get("name", ""),
        target=h.get("target", ""),
        queues=queues,
        concurrency=num("concurrency"),
        in_flight=num("in_flight"),
        jobs_done=num("jobs_done"),
        jobs_handled=num("jobs_handled"),
        state=h.get("state", "?"),
        running=num("running"),
        claimed_ahead=num("claimed_ahead"),
        load=load,
        started_at=num("started_at") / 1000,
        last_seen=num("last_seen") / 1000,
    )


async def queue_info(app: App, queues: Iterable[Queue] | None = None) -> list[QueueInfo]:
    """Counts per state, lifetime totals and recent throughput of ``queues`` (default: every declared queue).

    Throughput counts the jobs that finished in the last ``THROUGHPUT_WINDOW`` seconds (server clock). When
    retention already trimmed part of that window, the rate is taken over what is kept, which is exact
    because trimming drops the oldest first.
    """
    selected = list(app.queues.values()) if queues is None else list(queues)
    client = app.redis()
    workers = await list_workers(app)
    now_ms = await commands.server_ms(client)
    since = now_ms - int(THROUGHPUT_WINDOW * 1000)
    out: list[QueueInfo] = []
    for q in selected:
        k = q.keys
        with translated("the counts of a queue"):
            async with client.pipeline(transaction=True) as pipe:
                commands.count_states(pipe, k)  # waiting, active, delayed, completed, failed, expired
                pipe.hgetall(k.stats)
                pipe.zcount(k.completed, since, "+inf")
                pipe.zrange(k.completed, 0, 0, withscores=True)
                pipe.zcount(k.failed, since, "+inf")
                pipe.zrange(k.failed, 0, 0, withscores=True)
                res = await pipe.execute()
        (
            waiting,
            active,
            delayed,
            completed,
            failed,
            expired,
            stats,
            done_recent,
            oldest_done,
            failed_recent,
            oldest_failed,
        ) = res
        ret = q.retention
        done_window = _window(now_ms, since, completed >= ret.completed_count > 0, oldest_done)
        fail_window = _window(now_ms, since, failed >= ret.failed_count > 0, oldest_failed)
        consumers = [w for w in workers if q.name in w.queues]
        loads = [w.load.get(q.name, _NO_LOAD) for w in consumers]
        out.append(
            QueueInfo(
                queue=q.name,
                waiting=waiting,
                active=active,
                delayed=delayed,
                completed=completed,
                failed=failed,
                expired=expired,
                workers=len(consumers),
                concurrency=sum(w.queues[q.name] for w in consumers),
                running=sum(x.running for x in loads),
                claimed_ahead=sum(x.claimed_ahead for x in loads),
                completed_per_s=round(done_recent / done_window, 3),
                failed_per_s=round(failed_recent / fail_window, 3),
                window_s=round(min(done_window, fail_window), 3),
                totals={_text(key): int(v) for key, v in stats.items()},
            )
        )
    return out


def _window(now_ms: int, since: int, trimmed: bool, oldest: list[tuple[bytes, float]]) -> float:
    """Seconds to divide a recent count by: the full window, or what retention kept of it."""
    if trimmed and oldest and oldest[0][1] > since:
        return max(0.001, (now_ms - oldest[0][1]) / 1000)
    return THROUGHPUT_WINDOW


async def discover_queues(app: App) -> list[str]:
    """Names of the queues under ``app.prefix`` that Redis knows, sorted: those in live workers' heartbeats,
    and every queue a job was ever added to (its ``meta`` hash, found by ``SCAN``, never ``KEYS``)."""
    names = {q for w in await list_workers(app) for q in w.queues}
    head, tail = f"{app.prefix}:{{", "}:meta"
    pattern = glob_escape(head) + "*" + glob_escape(tail)
    with translated("SCAN"):
        async for raw in app.redis().scan_iter(match=pattern, count=1000, _type="hash"):
            key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            name = key[len(head) : -len(tail)]
            try:
                check_queue_name(name)
            except ValueError:
                continue  # another key that matches the pattern (a name with braces is no queue)
            if QueueKeys(app.prefix, name).meta == key:
                names.add(name)
    return sorted(names)


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern (a prefix may hold ``*``, ``?`` or brackets)."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


# -- job lists ----------------------------------------------------------------------------------------------

JOB_LIST_STATES = ("waiting", "delayed", "active", "completed", "failed", "expired")
"""The states ``list_jobs`` reads, each from its own key of the queue."""


class ListedJob(msgspec.Struct, frozen=True, kw_only=True):
    """One job id in a ``JobList``."""

    id: str
    at: float | None
    """Server time (Unix seconds): due (delayed), lease deadline (active), finished (completed, failed,
    expired); None for a waiting job."""


class JobList(msgspec.Struct, frozen=True, kw_only=True):
    """Up to ``limit`` job ids of one state of one queue, and how many jobs are in that state."""

    queue: str
    state: str
    total: int
    order: str
    """How ``jobs`` is sorted, in words."""
    jobs: list[ListedJob]


_LIST_ORDER = {
    "waiting": "next to run first",
    "delayed": "soonest due first",
    "active": "earliest lease deadline first",
    "completed": "newest first",
    "failed": "newest first",
    "expired": "newest first",
}


async def list_jobs(queue: Queue, state: str, limit: int) -> JobList:
    """The first ``limit`` job ids of ``queue`` in ``state`` (one of ``JOB_LIST_STATES``) and the total.

    A bounded read (``LRANGE`` / ``ZRANGE`` of ``limit`` entries) in one ``MULTI``, whatever the queue's size.
    """
    if state not in _LIST_ORDER:
        raise ValueError(f"state must be one of {', '.join(JOB_LIST_STATES)}, got {state!r}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit!r}")
    k = queue.keys
    client = queue.app.redis()
    with translated("a job list"):
        async with client.pipeline(transaction=True) as pipe:
            if state == "waiting":
                pipe.llen(k.wait)
                pipe.lrange(k.wait, -limit, -1)  # workers take from the right: the next ones are there
            else:
                zset = getattr(k, state)
                pipe.zcard(zset)
                if state in ("completed", "failed", "expired"):
                    pipe.zrevrange(zset, 0, limit - 1, withscores=True)
                else:
                    pipe.zrange(zset, 0, limit - 1, withscores=True)
            total, entries = await pipe.execute()
    if state == "waiting":
        jobs = [ListedJob(id=_job_id(raw), at=None) for raw in reversed(entries)]
    else:
        jobs = [ListedJob(id=_job_id(raw), at=score / 1000) for raw, score in entries]
    return JobList(queue=queue.name, state=state, total=int(total), order=_LIST_ORDER[state], jobs=jobs)


def _job_id(raw: bytes | str) -> str:
    """A job id for display: a raw write can store one that is not UTF-8."""
    return raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
