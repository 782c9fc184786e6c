"""Seeing and steering a fleet: worker heartbeats in Redis, queue counts and throughput, job inspection.

Every worker process started by ``qflow worker`` runs ``heartbeat`` beside its own tasks (a ``Worker``
companion). It writes a hash describing itself (host, pid, queues, concurrency, jobs running and claimed
ahead, jobs done, started at) that expires unless renewed, and its id in a fleet-wide sorted set;
``list_workers`` reads them from any machine. Keys are named in ``qflow._broker.keys.FleetKeys``. Times come
from the Redis server's clock.

Reading needs no ``App`` with processors: ``discover_queues`` finds the queues of a prefix from the
heartbeats and a ``SCAN`` of the key schema, so the operator commands work without ``module:app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import typing
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from . import _codec
from ._broker import commands, scripts
from ._broker.errors import translated
from ._broker.keys import FleetKeys, QueueKeys, check_queue_name
from .exceptions import BrokerUnavailable, JobNotFound, PayloadError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ._app import App
    from ._queue import Queue
    from ._worker.worker import Worker

__all__ = (
    "JOB_LIST_STATES",
    "JobInfo",
    "JobList",
    "ListedJob",
    "QueueInfo",
    "QueueLoad",
    "WorkerInfo",
    "concurrency_of",
    "discover_queues",
    "heartbeat",
    "list_jobs",
    "list_workers",
    "queue_info",
    "retry_failed",
    "show_job",
)

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
"""Seconds between two heartbeats of one worker process."""
HEARTBEAT_REFRESH = 0.5
"""Seconds after which a worker beats again, before its interval, when its running / claimed-ahead counts
changed: what ``qflow status`` and ``qflow info`` show is at most about this old."""
HEARTBEAT_TTL = 10.0
"""Seconds a worker stays listed after its last heartbeat (a SIGKILLed worker disappears after this)."""
THROUGHPUT_WINDOW = 60.0
"""Seconds of recent history ``queue_info`` measures throughput over."""


class QueueLoad(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker process holds of one queue, by its last heartbeat."""

    running: int = 0
    """Jobs whose handler runs now (never more than the process's concurrency on the queue)."""
    claimed_ahead: int = 0
    """Jobs claimed ahead (leased to this process) that wait for a free lane; not started yet."""


_NO_LOAD = QueueLoad()
_LOAD_ENCODER = msgspec.json.Encoder()
_LOAD_DECODER = msgspec.json.Decoder(dict[str, QueueLoad])


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
    """Lifetime counters: completed, failed, retried, stalled, stale_acks, released, requeued."""


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Everything stored about one job."""

    queue: str
    id: str
    state: str
    name: str | None
    payload: Any
    attempts_spent: int
    stalls: int
    options: dict[str, Any]
    """Per-job overrides given at ``add`` (attempts, timeout, backoff)."""
    result: Any = None
    error: dict[str, str] | None = None
    """type, message, traceback and kind of the last error."""
    since: float | None = None
    """Server time (Unix seconds): when it completed or failed; when a delayed job is due; lease deadline."""


# -- heartbeat (worker side) -----------------------------------------------------------------------------


def heartbeat(
    *,
    target: str = "",
    name: str = "",
    supervisor_pid: int = 0,
    concurrency: int | None = None,
    interval: float = HEARTBEAT_INTERVAL,
    ttl: float = HEARTBEAT_TTL,
    refresh: float = HEARTBEAT_REFRESH,
) -> Callable[[Worker], Awaitable[None]]:
    """A ``Worker`` companion registering the worker in the fleet registry until it stops.

    ``concurrency`` is the ``-c`` override the worker was built with (None: each processor's own).
    It beats every ``interval`` seconds, at once when the worker starts draining, and after ``refresh``
    seconds when its running / claimed-ahead counts changed; a worker that stops gracefully deregisters,
    one that dies drops out after ``ttl`` seconds.
    """

    async def run(worker: Worker) -> None:
        await _beat_forever(worker, target, name, supervisor_pid, concurrency, interval, ttl, refresh)

    return run


def concurrency_of(worker: Worker, override: int | None) -> dict[str, int]:
    """Queue name -> how many jobs ``worker`` runs at once on it (the sum of its processors' limits)."""
    return {q.name: sum(override or p.concurrency for p in q.processors.values()) for q in worker.queues}


async def _beat_forever(
    worker: Worker,
    target: str,
    name: str,
    supervisor_pid: int,
    override: int | None,
    interval: float,
    ttl: float,
    refresh: float,
) -> None:
    app = worker.app
    keys = FleetKeys(app.prefix)
    key = keys.worker(worker.id)
    queues = concurrency_of(worker, override)
    static: dict[str, str | int | bytes] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "supervisor_pid": supervisor_pid,
        "name": name or f"worker-{os.getpid()}",
        "target": target,
        "queues": msgspec.json.encode(queues),
        "concurrency": sum(queues.values()),
    }
    loop = asyncio.get_running_loop()
    started_ms: int | None = None
    failing = False
    last_state = ""
    last_load: dict[str, tuple[int, int]] | None = None
    last_beat = -interval
    try:
        while True:
            state = "draining" if worker.stopping else "running"
            load = worker.occupancy()
            since = loop.time() - last_beat
            if state != last_state or since >= interval or (load != last_load and since >= refresh):
                try:
                    client = app.redis()
                    now_ms = await _server_ms(client)
                    if started_ms is None:
                        started_ms = now_ms
                    fields: dict[str, str | int | bytes] = {
                        **static,
                        "in_flight": worker.in_flight,
                        "running": sum(n for n, _ in load.values()),
                        "claimed_ahead": sum(n for _, n in load.values()),
                        "load": _LOAD_ENCODER.encode(
                            {q: QueueLoad(running=n, claimed_ahead=m) for q, (n, m) in load.items()}
                        ),
                        "jobs_done": worker.jobs_done,
                        "jobs_handled": worker.jobs_handled,
                        "state": state,
                        "started_at": started_ms,
                        "last_seen": now_ms,
                    }
                    with translated("the fleet heartbeat"):
                        async with client.pipeline(transaction=True) as pipe:
                            pipe.hset(key, items=[part for kv in fields.items() for part in kv])
                            pipe.pexpire(key, int(ttl * 1000))
                            pipe.zadd(keys.workers, {worker.id: now_ms})
                            await pipe.execute()
                    last_state, last_load, last_beat = state, load, loop.time()
                    if failing:
                        log.info("fleet heartbeat restored")
                    failing = False
                except BrokerUnavailable as exc:
                    if not failing:
                        log.warning("fleet heartbeat failed (%s); `qflow status` may miss this worker", exc)
                    failing = True
                    last_beat = loop.time()
            await asyncio.sleep(min(0.2, interval))
    finally:
        # Deregister on a graceful stop (the companion is cancelled then). The worker cancels its tasks again
        # every 50 ms until they end (bpo-42130 workaround), so the deregistration runs in its own task and
        # those repeated cancels are absorbed until it is done: bounded by its own 1 s timeout, so a dead
        # Redis cannot hold the stop up (the hash would expire by itself anyway).
        done = asyncio.ensure_future(_deregister(app, keys, worker.id))
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(done)


async def _deregister(app: App, keys: FleetKeys, worker_id: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            async with app.redis().pipeline(transaction=True) as pipe:
                pipe.delete(keys.worker(worker_id))
                pipe.zrem(keys.workers, worker_id)
                await pipe.execute()


async def _server_ms(client: aioredis.Redis) -> int:
    """Milliseconds on the Redis server's clock (``TIME``)."""
    return await commands.server_ms(client)


# -- reading the fleet (any process) ----------------------------------------------------------------------


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
        load = _LOAD_DECODER.decode(h.get("load", "{}"))
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
    now_ms = await _server_ms(client)
    since = now_ms - int(THROUGHPUT_WINDOW * 1000)
    out: list[QueueInfo] = []
    for q in selected:
        k = q.keys
        with translated("the counts of a queue"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.llen(k.wait)
                pipe.zcard(k.active)
                pipe.zcard(k.delayed)
                pipe.zcard(k.completed)
                pipe.zcard(k.failed)
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
    pattern = _glob_escape(head) + "*" + _glob_escape(tail)
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


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


# -- jobs (operator verbs) ----------------------------------------------------------------------------------

JOB_LIST_STATES = ("waiting", "delayed", "active", "completed", "failed")
"""The states ``list_jobs`` reads, each from its own key of the queue."""


class ListedJob(msgspec.Struct, frozen=True, kw_only=True):
    """One job id in a ``JobList``."""

    id: str
    at: float | None
    """Server time (Unix seconds): due (delayed), lease deadline (active), finished (completed, failed);
    None for a waiting job."""


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
                if state in ("completed", "failed"):
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


async def show_job(queue: Queue, job_id: str) -> JobInfo:
    """Read everything stored about one job; raise ``JobNotFound`` if there is none."""
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
            for zset in (k.completed, k.failed, k.delayed, k.active):
                pipe.zscore(zset, job_id)
            state, env_raw, attempts, stalls, result, error, *scores = await pipe.execute()
    if state is None:
        raise JobNotFound(f"no job {job_id!r} in queue {queue.name!r} (never added, or trimmed by retention)")
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
        state=_text(state),
        name=name,
        payload=payload,
        attempts_spent=int(attempts or 0),
        stalls=int(stalls or 0),
        options=msgspec.to_builtins(options),
        result=_codec.decode_any(result) if result is not None else None,
        error=msgspec.structs.asdict(_codec.decode_error(error)) if error is not None else None,
        since=None if since is None else since / 1000,
    )


async def retry_failed(
    queue: Queue, job_ids: Iterable[str] | None = None, *, batch: int = 500
) -> dict[str, int]:
    """Put failed jobs back in ``wait`` with fresh attempts (all of them when ``job_ids`` is None).

    Returns ``{"requeued": n, "not_failed": n, "missing": n}``. Each job moves in one atomic script call
    (``lua/retry_failed.lua``), so a job is never seen half-moved, and a job that is not ``failed`` (it was
    retried already, or is running) is left alone.
    """
    keys = queue.keys
    client = queue.app.redis()
    counts = {"requeued": 0, "not_failed": 0, "missing": 0}
    if job_ids is None:
        previous = -1
        while True:
            moved, left = await scripts.retry_oldest_failed(client, keys, batch)
            counts["requeued"] += moved
            if left == 0 or left == previous:
                return counts
            previous = left
    ids = list(job_ids)
    names = {
        scripts.Requeue.REQUEUED: "requeued",
        scripts.Requeue.NOT_FAILED: "not_failed",
        scripts.Requeue.MISSING: "missing",
    }
    for start in range(0, len(ids), batch):
        for outcome in await scripts.retry_failed(client, keys, ids[start : start + batch]):
            counts[names[outcome]] += 1
    return counts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
