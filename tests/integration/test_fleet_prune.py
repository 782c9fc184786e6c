"""The fleet registry stays bounded without a reader: a live worker's heartbeat prunes the dead ones."""

from __future__ import annotations

import asyncio
import time

import qflow
from qflow._broker import commands
from qflow._broker.keys import FleetKeys
from qflow._fleet import HEARTBEAT_TTL, heartbeat


async def test_a_heartbeat_prunes_workers_dead_for_longer_than_the_ttl(app: qflow.App) -> None:
    """Entries silent for longer than the TTL go at a live beat; a recent one and the beater stay."""
    q = app.queue("fleet-prune")

    @q.processor()
    async def noop(job: qflow.Job[None]) -> None:
        return None

    client = app.redis()
    keys = FleetKeys(app.prefix)
    now_ms = await commands.server_ms(client)
    ttl_ms = int(HEARTBEAT_TTL * 1000)
    dead = {f"deadhost:{n}:0000dead": now_ms - ttl_ms - 1000 * (n + 1) for n in range(50)}
    recent = {"otherhost:1:0000live": now_ms - ttl_ms // 2}  # silent for less than the TTL: maybe alive
    await client.zadd(keys.workers, {**dead, **recent})

    worker = qflow.Worker(app, companions=[heartbeat(interval=0.05)])
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 5)
        deadline = time.monotonic() + 5
        while await client.zscore(keys.workers, worker.id) is None:  # polled, not slept: the first beat
            assert time.monotonic() < deadline, "the worker never registered"
            await asyncio.sleep(0.01)
        members = {m.decode() for m in await client.zrange(keys.workers, 0, -1)}
        assert members == {worker.id, *recent}  # no `qflow status` / list_workers call in between
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
