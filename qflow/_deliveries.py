"""What a worker holds for each queue and each claimed job: slots, deliveries, the claim reply format.

``_worker.py`` runs the loop; this module holds its per-queue and per-job state.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio

from ._aio import wait_first

if TYPE_CHECKING:
    from ._keys import QueueKeys
    from ._queue import Queue

__all__ = ("Delivery", "QueueRunner", "Slots", "unpack_claimed")


class Slots:
    """A counter of free job slots; the fetcher takes several at once, handlers give them back one by one."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._event = asyncio.Event()
        self._event.set()

    async def take(self, most: int, stop: asyncio.Event) -> int:
        while self.free == 0 and not stop.is_set():
            self._event.clear()
            await wait_first(self._event.wait(), stop.wait())
        if stop.is_set():
            return 0
        n = min(self.free, most)
        self.free -= n
        return n

    def give(self, n: int = 1) -> None:
        self.free += n
        self._event.set()


class Delivery:
    """One claimed job in this process: its id, fencing token, raw envelope and handler task."""

    __slots__ = (
        "attempts", "cancel_reason", "envelope", "finishing", "id", "notify", "raw", "stalls", "task",
        "token",
    )  # fmt: skip

    def __init__(
        self, raw: bytes, token: bytes, envelope: bytes, attempts: int, stalls: int, keys: QueueKeys
    ):
        # Ids go back to Redis as the exact bytes the claim returned: a raw write can make an id that is not
        # UTF-8, and it must neither crash the worker nor address another job.
        self.raw = raw
        self.id = raw.decode("utf-8", "surrogateescape")
        self.notify = keys.notify(self.id).encode("utf-8", "surrogateescape")
        self.token = token
        self.envelope = envelope
        self.attempts = attempts
        self.stalls = stalls
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.finishing = False  # an ack (complete/fail/retry) is on its way: a renewal may race with it


class QueueRunner:
    """Per-queue state of a worker: processors, slots, deliveries in flight, pending acks."""

    def __init__(self, queue: Queue, concurrency: int | None) -> None:
        self.queue = queue
        self.keys = queue.keys
        self.concurrency = {
            name: (concurrency or proc.concurrency) for name, proc in queue.processors.items()
        }
        self.semaphores = {name: asyncio.Semaphore(n) for name, n in self.concurrency.items()}
        self.limiters = {name: anyio.CapacityLimiter(n) for name, n in self.concurrency.items()}
        self.slots = Slots(sum(self.concurrency.values()))
        self.in_flight: dict[str, Delivery] = {}
        self.pending_acks: list[tuple[Delivery, bytes, asyncio.Future[bool]]] = []
        self.ack_event = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()


_CLAIM_HEAD = struct.Struct(">IIIII")


def unpack_claimed(packed: bytes) -> Iterator[tuple[bytes, bytes, bytes, int, int]]:
    """Split claim.lua's packed reply into (id, token, envelope, attempts spent, stalls) per job."""
    head = _CLAIM_HEAD
    size = head.size
    pos = 0
    end = len(packed)
    while pos < end:
        id_len, token_len, env_len, attempts, stalls = head.unpack_from(packed, pos)
        pos += size
        raw_id = packed[pos : pos + id_len]
        pos += id_len
        token = packed[pos : pos + token_len]
        pos += token_len
        envelope = packed[pos : pos + env_len]
        pos += env_len
        yield raw_id, token, envelope, attempts, stalls
