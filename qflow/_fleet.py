"""The worker-side fleet registry: each worker process announces itself with a heartbeat in Redis.

Every worker process started by ``qflow worker`` runs ``heartbeat`` beside its own tasks (a ``Worker``
companion). It writes a hash describing itself (host, pid, queues, concurrency, jobs running and claimed
ahead, jobs done, started at) that expires unless renewed, and its id in a fleet-wide sorted set scored by
its last heartbeat. The same ``MULTI`` removes from that set every worker whose last heartbeat is older than
the dead-after bound (``HEARTBEAT_TTL``, or the writer's longer ``ttl``): its hash has expired, so it is
dead, and the set stays bounded while any worker runs, with no reader needed. Keys are named in
``qflow._broker.keys.FleetKeys``; times come from the Redis server's clock. Reading the registry
back (``list_workers``) is ``qflow._inspect``'s job; ``QueueLoad`` is the one format both sides share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from ._broker import commands
from ._broker.errors import translated
from ._broker.keys import FleetKeys
from .exceptions import BrokerError

if TYPE_CHECKING:
    from ._app import App
    from ._worker.worker import Worker

__all__ = (
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_REFRESH",
    "HEARTBEAT_TTL",
    "LOAD_DECODER",
    "QueueLoad",
    "concurrency_of",
    "heartbeat",
)

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
"""Seconds between two heartbeats of one worker process."""
HEARTBEAT_REFRESH = 0.5
"""Seconds after which a worker beats again, before its interval, when its running / claimed-ahead counts
changed: what ``qflow status`` and ``qflow info`` show is at most about this old."""
HEARTBEAT_TTL = 10.0
"""Seconds a worker stays listed after its last heartbeat (a SIGKILLed worker disappears after this)."""


class QueueLoad(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker process holds of one queue, by its last heartbeat."""

    running: int = 0
    """Jobs whose handler runs now (never more than the process's concurrency on the queue)."""
    claimed_ahead: int = 0
    """Jobs claimed ahead (leased to this process) that wait for a free lane; not started yet."""


_LOAD_ENCODER = msgspec.json.Encoder()
LOAD_DECODER = msgspec.json.Decoder(dict[str, QueueLoad])
"""Reads the ``load`` field of a heartbeat hash: queue name -> ``QueueLoad``."""


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
    one that dies drops out after ``ttl`` seconds. Each beat also prunes the fleet set of workers silent for
    longer than ``max(ttl, HEARTBEAT_TTL)`` (so a short ``ttl`` never prunes a live worker on the default
    timing).
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
    dead_after_ms = int(max(ttl, HEARTBEAT_TTL) * 1000)
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
                    client = app._worker_redis()  # the worker's own pool: never waits behind handlers
                    now_ms = await commands.server_ms(client)
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
                            pipe.zremrangebyscore(keys.workers, "-inf", f"({now_ms - dead_after_ms}")
                            await pipe.execute()
                    last_state, last_load, last_beat = state, load, loop.time()
                    if failing:
                        log.info("fleet heartbeat restored")
                    failing = False
                except BrokerError as exc:
                    # Any broker trouble (unreachable, maxmemory, an ACL change) is logged and retried: the
                    # heartbeat task must not end while its worker runs.
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
            async with app._worker_redis().pipeline(transaction=True) as pipe:
                pipe.delete(keys.worker(worker_id))
                pipe.zrem(keys.workers, worker_id)
                await pipe.execute()
