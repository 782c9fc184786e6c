"""``Job``: a handle on one job (its id, name and payload; its status and result).

Producers get one from ``add``; processors receive one as their argument. Its own module so that the
processor metadata (``_processor``) and the producer side (``_queue``) can both use it without importing
each other.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _codec
from ._broker import scripts
from ._broker.errors import translated
from ._dedup import AddOutcome
from ._settings import MAX_SECONDS, check_number
from ._state import State
from .exceptions import JobExpired, JobFailed, JobNotFound, ResultTimeout

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = ("Job",)

T = TypeVar("T")


class Job(Generic[T]):
    """A handle on one job. Producers get it from ``add``; processors receive it as their argument.

    ``payload`` is the validated payload (a typed processor's Struct, or plain data). In a processor,
    ``attempt`` is the number of this run (1 = first) and ``stalls`` how many times the job was recovered
    from a dead worker. On a handle ``add`` returned, ``outcome`` (``qflow.AddOutcome``) says what the add
    did: created, exists (same ``job_id``), throttled or debounced (``dedup=``).
    """

    __slots__ = ("attempt", "id", "name", "outcome", "payload", "queue", "stalls")

    def __init__(
        self, queue: Queue, id: str, name: str, payload: T, *, attempt: int = 0, stalls: int = 0
    ) -> None:
        self.queue = queue
        self.id = id
        self.name = name
        self.payload = payload
        self.attempt = attempt
        self.stalls = stalls
        self.outcome: AddOutcome | None = None
        """What the ``add`` that returned this handle did (``qflow.AddOutcome``); None on other handles."""

    def __repr__(self) -> str:
        return f"<qflow.Job {self.queue.name}:{self.name} id={self.id}>"

    async def status(self) -> State | None:
        """The job's current state, or ``None`` if no such job exists (never added, or trimmed)."""
        client = self.queue.app.redis()
        with translated("HGET state"):
            raw = await client.hget(self.queue.keys.state, self.id)
        return None if raw is None else State(_text(raw))

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its result.

        Raises ``JobFailed`` if it failed, ``JobExpired`` (a ``JobFailed``, kind ``"expired"``) if it was not
        started before its ``expires=`` deadline, ``ResultTimeout`` after ``timeout`` seconds (``None``: wait
        forever), ``JobNotFound`` if there is no such job. Waiting blocks on the server; it does not poll.
        The blocking waits of one process share a pool of their own (``App(max_result_waits=)``), so they
        never take the connections ``add`` and other commands need; past that many concurrent waits, the
        extra ones queue for a connection and read the job's state again about every 2 s meanwhile.
        """
        if timeout is not None:
            check_number(
                "timeout",
                timeout,
                ge=0,
                le=MAX_SECONDS,
                unit="seconds, or None to wait until the job finishes",
            )
        app = self.queue.app
        client = app.redis()
        waits = app._result_waits()
        keys = self.queue.keys
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        notify = keys.notify(self.id)
        # A blocking call must return before the socket timeout fires; recovery by the stalled-job checker
        # does not notify, so re-reading every few seconds also bounds how late such a failure is seen.
        chunk = max(0.05, min(2.0, app.socket_timeout - 1.0))
        while True:
            state, data = await scripts.watch(client, keys, self.id)
            if state is None:
                raise JobNotFound(f"no job {self.id!r} in queue {self.queue.name!r}", job_id=self.id)
            if state == "completed":
                return _codec.decode_any(data) if data is not None else None
            if state == "failed":
                info = (
                    _codec.decode_error(data)
                    if data is not None
                    else _codec.ErrorInfo(type="Unknown", message="no error recorded")
                )
                raise JobFailed(self.id, info.type, info.message, info.traceback, kind=info.kind)
            if state == "expired":
                raise JobExpired(self.id)
            wait = chunk
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ResultTimeout(
                        f"job {self.id} in queue {self.queue.name!r} not finished after {timeout}s "
                        f"(state: {state})",
                        job_id=self.id,
                    )
                wait = min(wait, remaining)
            await waits.wait_for_push(notify, wait)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
