"""Coalescing concurrent ``Queue.add`` calls of one queue into one ``add`` script call (issue #6).

Split from ``_queue`` (which keeps the validation and the public verbs): the batching, and how a failed call
is settled for each add in it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._broker import scripts
from .exceptions import BrokerError, BrokerUnavailable

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = ("ADD_CHUNK", "AddBatcher")

ADD_CHUNK = 500  # jobs per add script call: bounds the time one script holds the server


class AddBatcher:
    """Coalesces concurrent ``add`` calls of one queue into one script call (issue #6).

    A lone ``add`` goes out at once: one round trip, no added latency. Adds that arrive while a call is in
    flight wait for it and then go out together, up to ``ADD_CHUNK`` jobs per call, so a producer with many
    coroutines adding at once needs far fewer round trips than jobs. Every job was validated, and its id
    encoded, before it queued here, so nothing one caller passed should fail another's add. Second line of
    defence: a call that fails for a reason that is not the server's or the connection's (not a
    ``BrokerError``) failed on some job's data, so each job of it is sent again alone and only the add of
    the job that cannot be written raises. When the server or the connection fails a call, every add in it
    raises; retrying is safe (same ids, idempotent).
    """

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.busy = False
        self.waiting: list[tuple[scripts.NewJob, asyncio.Future[bool]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def submit(self, job: scripts.NewJob) -> bool:
        """Add ``job``; True if it was created, False if a job with its id existed."""
        if self.busy:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.waiting.append((job, fut))
            return await fut
        self.busy = True
        try:
            return (await self.queue._run_add([job]))[0]
        finally:
            if self.waiting:
                # Keep a reference: the event loop holds tasks only weakly.
                self.flusher = asyncio.get_running_loop().create_task(self._flush())
            else:
                self.busy = False

    async def _flush(self) -> None:
        batch: list[tuple[scripts.NewJob, asyncio.Future[bool]]] = []
        try:
            while self.waiting:
                batch = self.waiting[:ADD_CHUNK]
                del self.waiting[:ADD_CHUNK]
                try:
                    created = await self.queue._run_add([job for job, _ in batch])
                except BrokerError as exc:  # the server or the connection: the same for every job
                    _settle(batch, exc)
                except Exception as exc:
                    if len(batch) == 1:
                        _settle(batch, exc)
                    else:
                        await self._one_by_one(batch)
                else:
                    _settle(batch, None, created)
        finally:
            for _, fut in batch + self.waiting:  # only left unresolved if this task itself was cancelled
                if not fut.done():
                    fut.set_exception(BrokerUnavailable("add was interrupted before it was sent"))
            self.waiting.clear()
            self.busy = False

    async def _one_by_one(self, batch: list[tuple[scripts.NewJob, asyncio.Future[bool]]]) -> None:
        """Send each job of a failed call alone: a job that cannot be written fails only its own add.

        Safe to repeat: the ids were fixed before the first try, and a job the failed call did write is
        recognised by its id, not added twice. A server or connection error ends the round for all.
        """
        for i, (job, fut) in enumerate(batch):
            if fut.done():  # its caller was cancelled
                continue
            try:
                (created,) = await self.queue._run_add([job])
            except BrokerError as exc:
                _settle(batch[i:], exc)
                return
            except Exception as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(created)


def _settle(
    batch: list[tuple[scripts.NewJob, asyncio.Future[bool]]],
    exc: BaseException | None,
    created: list[bool] | None = None,
) -> None:
    """Resolve the adds of ``batch`` still waiting: raise ``exc`` in each, or return what ``created`` says
    of each (``exc`` None)."""
    for i, (_, fut) in enumerate(batch):
        if not fut.done():
            if exc is None:
                fut.set_result(created[i] if created is not None else True)
            else:
                fut.set_exception(exc)
