"""The producer side: ``Queue`` (``processor`` to declare, ``add``/``add_bulk`` to enqueue, counts).

The ``Job`` handle lives in ``_job``; job options (attempts, timeout, backoff) in ``_options``.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, overload

import msgspec

from . import _admin, _codec
from ._adding import ADD_CHUNK, AddBatcher
from ._broker import commands, scripts
from ._broker.errors import is_timeout, translated
from ._broker.keys import QueueKeys
from ._dedup import AddOutcome, Dedup
from ._job import Job
from ._options import JobOptions, job_options
from ._processor import Processor
from ._schedule import Declared, ScheduleMethods
from ._settings import MAX_SECONDS, check_number
from ._state import Backoff
from ._timing import Expires, expiry_ms, run_at_ms
from .exceptions import BrokerUnavailable, ConfigurationError, PayloadError, UnknownJobName

if TYPE_CHECKING:
    from ._app import App
    from ._settings import RetentionSettings

__all__ = ("JobSpec", "Queue")

T = TypeVar("T")
R = TypeVar("R")


class JobSpec(msgspec.Struct, frozen=True):
    """One job for ``Queue.add_bulk``: the same fields as ``Queue.add``'s arguments.

    ``attempts``, ``timeout`` and ``backoff`` win over the same fields of ``options``. Checked by
    ``add_bulk``, not here, so one bad spec raises before anything of the batch is written.
    """

    name: str
    payload: Any = None
    job_id: str | None = None
    delay: float | None = None
    run_at: datetime | None = None
    attempts: int | None = None
    timeout: float | None = None
    backoff: Backoff | None = None
    options: JobOptions | None = None
    expires: Expires | None = None
    dedup: Dedup | None = None


class Queue(ScheduleMethods):
    """A named queue. ``add`` enqueues from any process; ``@queue.processor`` declares a consumer.

    Repeatable jobs: ``@queue.cron(...)``, ``schedule``, ``unschedule``, ``schedules`` (``qflow._schedule``).
    """

    def __init__(self, app: App, name: str, *, retention: RetentionSettings) -> None:
        self.app = app
        self.name = name
        self.retention = retention
        self.keys = QueueKeys(app.prefix, name)
        self.processors: dict[str, Processor[Any, Any]] = {}
        self._declared: dict[str, Declared] = {}
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AddBatcher] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<qflow.Queue {self.name!r} processors={sorted(self.processors)}>"

    @overload
    def processor(
        self,
        fn: Callable[[Job[T]], Awaitable[R]],
        /,
    ) -> Processor[T, R]: ...

    @overload
    def processor(
        self,
        fn: Callable[[Job[T]], R],
        /,
    ) -> Processor[T, R]: ...

    @overload
    def processor(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        concurrency: int = 1,
        attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        options: JobOptions | None = None,
    ) -> _Decorator: ...

    def processor(
        self,
        fn: Callable[[Job[Any]], Any] | None = None,
        /,
        *,
        name: str | None = None,
        concurrency: int = 1,
        attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        options: JobOptions | None = None,
    ) -> Processor[Any, Any] | _Decorator:
        """Declare the handler for jobs called ``name`` (default: the function's name) on this queue.

        Use bare (``@queue.processor``) or with options (``@queue.processor(concurrency=5, attempts=3)``).
        ``concurrency`` bounds how many of its jobs one worker process runs at once. ``attempts`` (default 1),
        ``timeout`` (seconds, default none) and ``backoff`` are the defaults its jobs run with (see
        ``qflow.JobOptions``; give them as keywords or as ``options=``); ``add`` may override them per job.
        ``async def`` handlers run on the worker's event loop; plain ``def`` handlers run in a thread, never
        on the loop. Declaring starts nothing: a worker process runs the processors.
        """
        defaults = job_options(options, attempts=attempts, timeout=timeout, backoff=backoff)

        def register(f: Callable[[Job[Any]], Any]) -> Processor[Any, Any]:
            job_name = name or getattr(f, "__name__", None)
            if not job_name or not isinstance(job_name, str):
                raise ConfigurationError(f"processor {f!r} needs an explicit name=")
            _check_text("processor name", job_name, ConfigurationError)
            if job_name in self.processors:
                raise ConfigurationError(f"queue {self.name!r} already has a processor named {job_name!r}")
            proc: Processor[Any, Any] = Processor(
                self, f, name=job_name, concurrency=concurrency, options=defaults
            )
            self.processors[job_name] = proc
            return proc

        if fn is not None:
            return register(fn)
        return _Decorator(register)

    def _prepare(self, spec: JobSpec) -> tuple[Job[Any], scripts.NewJob]:
        """Validate and encode one job; nothing is written. Returns its handle and what ``add`` stores."""
        if not isinstance(spec.name, str) or not spec.name:
            raise ConfigurationError(f"job name must be a non-empty str, got {spec.name!r}")
        proc = self.processors.get(spec.name)
        if proc is None and self.processors:
            raise UnknownJobName(
                f"queue {self.name!r} has no processor named {spec.name!r} "
                f"(registered: {', '.join(sorted(self.processors))})"
            )
        if proc is not None:
            payload, data = proc.validate(spec.payload)
        else:
            _check_text("job name", spec.name, PayloadError)  # a registered name was checked when declared
            payload = spec.payload
            data = _codec.encode_payload(
                payload, limit=self.app.max_payload_bytes, what=f"job {self.name}:{spec.name}"
            )
        job_id = spec.job_id
        raw_id: str | bytes
        if job_id is None:
            job_id = raw_id = secrets.token_hex(10)  # ASCII: nothing to check
        else:
            if not isinstance(job_id, str) or not job_id or len(job_id) > 256:
                raise ConfigurationError(f"job_id must be a non-empty str of <= 256 chars, got {job_id!r}")
            # Encoded here, not when the batch is sent: an id with no UTF-8 form (a lone surrogate) fails
            # this add alone instead of every add coalesced with it (issue 12 item 5).
            raw_id = _check_text("job_id", job_id, PayloadError)
        options = job_options(
            spec.options, attempts=spec.attempts, timeout=spec.timeout, backoff=spec.backoff
        )
        if spec.delay is not None and spec.run_at is not None:
            raise ConfigurationError("give delay= or run_at=, not both")
        delay_ms = 0
        if spec.delay is not None:
            delay = spec.delay
            if not (type(delay) in (float, int) and 0 <= delay <= MAX_SECONDS):  # nan fails this too
                check_number("delay", delay, ge=0, le=MAX_SECONDS, unit="seconds")
            delay_ms = int(delay * 1000)
        at_ms = 0 if spec.run_at is None else run_at_ms(spec.run_at)
        expires_in, expires_at = expiry_ms(spec.expires)
        envelope = _codec.encode_envelope(_codec.Envelope.of(spec.name, data, options))
        new = scripts.NewJob(raw_id, envelope, delay_ms, at_ms, expires_in, expires_at)
        if spec.dedup is not None:
            if not isinstance(spec.dedup, Dedup):
                raise ConfigurationError(f"dedup must be a qflow.Dedup or None, got {spec.dedup!r}")
            new.dedup_key = spec.dedup.key.encode()
            new.dedup_mode = spec.dedup.mode
            new.dedup_ttl_ms = spec.dedup.ttl_ms
        return Job(self, job_id, spec.name, payload), new

    def _envelope(self, name: str, payload: Any, options: JobOptions | None) -> bytes:
        """The stored envelope of a job ``add`` would create (checked as ``add`` checks it; no id, no I/O)."""
        envelope = self._prepare(JobSpec(name, payload, options=options))[1].envelope
        return envelope if isinstance(envelope, bytes) else envelope.encode()

    async def add(
        self,
        name: str,
        payload: Any = None,
        *,
        job_id: str | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        options: JobOptions | None = None,
        expires: Expires | None = None,
        dedup: Dedup | None = None,
    ) -> Job[Any]:
        """Enqueue one job; when this returns, the job is in Redis (one round trip).

        ``job_id`` makes the call idempotent: while a job with that id exists, adding it again returns a
        handle on the existing job. ``delay`` (seconds) or ``run_at`` (aware datetime) postpone it, timed by
        the Redis server's clock. ``attempts``, ``timeout`` and ``backoff`` (or ``options=JobOptions(...)``;
        keywords win over its fields) override the processor's defaults for this job. ``expires`` (seconds
        or a ``timedelta`` from now, or an aware datetime) is a deadline for the job's start: a job no worker
        claimed by then is discarded as ``expired`` and never runs (``result()`` raises ``JobExpired``; see
        docs/scheduling.md). ``dedup=qflow.Dedup(key, ttl, mode="throttle"|"debounce")`` collapses adds
        with the same key (see ``Dedup``); the handle is then on the job the key names. ``job.outcome``
        (``AddOutcome``) says what the add did. Invalid input raises ``ConfigurationError`` or
        ``PayloadError`` before anything is written.
        """
        job, new = self._prepare(
            JobSpec(name, payload, job_id, delay, run_at, attempts, timeout, backoff, options, expires, dedup)
        )
        if new.dedup_key:
            return (await self._add_dedup([(job, new)]))[0]
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = AddBatcher(self)
        job.outcome = AddOutcome.CREATED if await batcher.submit(new) else AddOutcome.EXISTS
        return job

    async def _add_dedup(self, prepared: list[tuple[Job[Any], scripts.NewJob]]) -> list[Job[Any]]:
        """Send jobs with a dedup key (``lua/dedup.lua``), in order; handles on the jobs their keys name."""
        news = [new for _, new in prepared]
        try:
            replies = await scripts.add_dedup(self.app.redis(), self.keys, news)
        except BrokerUnavailable as exc:
            if is_timeout(exc):
                raise
            # One retry, as for add: a landed write is recognised (the key names the job: "throttled" or
            # "debounced" again, with the same payload).
            replies = await scripts.add_dedup(self.app.redis(), self.keys, news)
        out = []
        for (job, _), (outcome, raw_id) in zip(prepared, replies, strict=True):
            job_id = raw_id.decode("utf-8", "backslashreplace") if isinstance(raw_id, bytes) else raw_id
            handle = job if job_id == job.id else Job(self, job_id, job.name, job.payload)
            handle.outcome = AddOutcome(outcome)
            out.append(handle)
        return out

    async def add_bulk(self, jobs: Iterable[JobSpec]) -> list[Job[Any]]:
        """Enqueue many jobs in few round trips (one script call per 500 jobs).

        Every job is validated first; if any is invalid, none is written. Jobs with ``dedup`` follow the
        same rules as in ``add``, in the order given (one script call per 500 of them, after the others);
        each handle's ``outcome`` says what became of its job.
        """
        prepared = [self._prepare(spec) for spec in jobs]
        handles = [job for job, _ in prepared]
        plain = [i for i, (_, new) in enumerate(prepared) if not new.dedup_key]
        keyed = [i for i, (_, new) in enumerate(prepared) if new.dedup_key]
        for start in range(0, len(plain), ADD_CHUNK):
            chunk = plain[start : start + ADD_CHUNK]
            created = await self._run_add([prepared[i][1] for i in chunk])
            for i, new_job in zip(chunk, created, strict=True):
                handles[i].outcome = AddOutcome.CREATED if new_job else AddOutcome.EXISTS
        for start in range(0, len(keyed), ADD_CHUNK):
            chunk = keyed[start : start + ADD_CHUNK]
            for i, handle in zip(chunk, await self._add_dedup([prepared[i] for i in chunk]), strict=True):
                handles[i] = handle
        return handles

    async def _run_add(self, jobs: list[scripts.NewJob]) -> list[bool]:
        try:
            return await scripts.add(self.app.redis(), self.keys, jobs)
        except BrokerUnavailable as exc:
            if is_timeout(exc):
                raise  # a silent server: do not double the wait
            # One retry for a connection that died under us (e.g. a server restart). Safe: the ids were
            # made before the first try, so a write that did land is recognised and not repeated.
            return await scripts.add(self.app.redis(), self.keys, jobs)

    def job(self, job_id: str) -> Job[Any]:
        """A handle on an existing job by id (no I/O; ``status()`` tells whether it exists)."""
        return Job(self, job_id, "", None)

    async def counts(self) -> dict[str, int]:
        """Jobs per state right now: waiting, active, delayed, completed, failed, expired (one round trip)."""
        k = self.keys
        client = self.app.redis()
        with translated("the counts of a queue"):
            async with client.pipeline(transaction=True) as pipe:
                commands.count_states(pipe, k)
                values = await pipe.execute()
        return dict(zip(commands.COUNTED_STATES, values, strict=True))

    async def stats(self) -> dict[str, int]:
        """Lifetime counters: completed, failed, expired, retried, stalled, stale_acks, released (a counter
        is missing until it first counts)."""
        with translated("HGETALL stats"):
            raw = await self.app.redis().hgetall(self.keys.stats)
        return {_text(key): int(value) for key, value in raw.items()}

    # -- admin: look up, retry and delete jobs (qflow._admin; also `qflow jobs show|retry|purge`) -----------

    async def get_job(self, job_id: str) -> _admin.JobInfo:
        """Everything stored about one job right now, in one round trip: its state, processor name, payload,
        attempts spent, stalls, last error, whether it has a result (and the result), and the server time
        that goes with its state (finished, due, or lease deadline).

        Raises ``JobNotFound`` if there is no such job (never added, or trimmed by retention). A snapshot for
        inspecting; to wait for a job's outcome use ``job(job_id).result()``.
        """
        return await _admin.get_job(self, job_id)

    async def retry_failed(
        self, ids: Iterable[str] | None = None, *, limit: int | None = None
    ) -> _admin.RetryReport:
        """Put failed jobs back in ``waiting`` with a fresh set of attempts, at the back of the line; their
        attempt and stall counts and last error are cleared, their id and payload kept.

        With ``ids``, exactly those jobs: an id whose job is not failed (retried already, running,
        completed) is left alone and listed in ``not_failed``, one with no job in ``missing``. Without
        ``ids``, the ``limit`` oldest failures (``None``: every failed job). Each job moves atomically, in
        script calls of up to 500 jobs, so a worker can run it as soon as it is back. Raises
        ``ConfigurationError`` for both ``ids`` and ``limit``, or a bad ``limit``.
        """
        return await _admin.retry_failed(self, ids, limit=limit)

    async def purge(self) -> int:
        """Delete every job of this queue, in every state, with its results, errors and lifetime counters;
        return how many Redis keys were deleted. Irreversible.

        Only this queue's keys are touched (its fixed keys, and its per-job notify lists found by ``SCAN``,
        never ``KEYS``); other queues and anything else on the server are left alone. Stop or drain the
        workers first: a worker running one of the deleted jobs loses its lease (the handler is cancelled at
        its next renewal, and an ack is rejected as stale). Producers can add to the queue again right away.
        """
        return await _admin.purge(self)


def _check_text(what: str, value: str, error: type[ConfigurationError | PayloadError]) -> bytes:
    """``value`` as UTF-8, as Redis will store it; raise ``error`` naming ``what`` if it has no UTF-8 form.

    Python strs may hold lone surrogates (``"\\ud800"``, from a bad decode or ``surrogateescape``), which
    UTF-8 cannot encode.
    """
    try:
        return value.encode()
    except UnicodeEncodeError as exc:
        raise error(
            f"{what} {value!r} is not valid text: {exc.reason} at index {exc.start} "
            "(a lone surrogate has no UTF-8 form)"
        ) from None


class _Decorator:
    """What ``queue.processor(...)`` with options returns: apply it to the handler."""

    def __init__(self, register: Callable[[Callable[[Job[Any]], Any]], Processor[Any, Any]]) -> None:
        self._register = register

    @overload
    def __call__(self, fn: Callable[[Job[T]], Awaitable[R]], /) -> Processor[T, R]: ...

    @overload
    def __call__(self, fn: Callable[[Job[T]], R], /) -> Processor[T, R]: ...

    def __call__(self, fn: Callable[[Job[Any]], Any], /) -> Processor[Any, Any]:
        return self._register(fn)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
