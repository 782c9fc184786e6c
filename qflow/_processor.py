"""``Processor``: what ``@queue.processor`` returns — metadata about a handler, and its typed ``add``."""

from __future__ import annotations

import inspect
import typing
import warnings
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from ._codec import DECODE_ERRORS, encode_payload
from ._dedup import Dedup
from ._job import Job
from ._options import DEFAULT_ATTEMPTS, JobOptions, job_options
from ._settings import MAX_CONCURRENCY, check_number
from ._state import Backoff
from ._timing import Expires
from .exceptions import ConfigurationError, PayloadError

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = ("Processor",)

T = TypeVar("T")
R = TypeVar("R")

_UNSET: Any = object()


class Processor(Generic[T, R]):
    """A registered handler for jobs called ``name`` on ``queue``.

    Declaring one records metadata only. ``concurrency`` bounds how many of these jobs run at once in one
    worker process; ``options`` (a ``JobOptions``: ``attempts``, ``timeout``, ``backoff``) are the defaults
    each job runs with unless it overrides them at ``add``.
    """

    def __init__(
        self,
        queue: Queue,
        fn: Callable[[Job[T]], Awaitable[R]] | Callable[[Job[T]], R],
        *,
        name: str,
        concurrency: int,
        options: JobOptions,
    ) -> None:
        if not callable(fn):
            raise ConfigurationError(f"processor must be a function, got {fn!r}")
        check_number("concurrency", concurrency, ge=1, le=MAX_CONCURRENCY, integer=True)
        if not isinstance(options, JobOptions):
            raise ConfigurationError(f"options must be a qflow.JobOptions, got {options!r}")
        self.queue = queue
        self.fn = fn
        self.name = name
        self.concurrency = concurrency
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self._payload_type: Any = _UNSET
        self._decoder: msgspec.msgpack.Decoder[Any] | None = None
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    @property
    def attempts(self) -> int:
        """Total runs a job gets when its handler raises, unless it overrides it (``options.attempts``)."""
        return DEFAULT_ATTEMPTS if self.options.attempts is None else self.options.attempts

    @property
    def timeout(self) -> float | None:
        """Seconds a run may take before it is cancelled (``options.timeout``); ``None``: no limit."""
        return self.options.timeout

    @property
    def backoff(self) -> Backoff | None:
        """Retry spacing set on this processor (``options.backoff``); ``None``: qflow's default backoff."""
        return self.options.backoff

    def __repr__(self) -> str:
        return f"<qflow.Processor {self.queue.name}:{self.name} concurrency={self.concurrency}>"

    @property
    def payload_type(self) -> Any:
        """The ``X`` of the handler's ``job: Job[X]`` annotation, or ``Any`` when it has none.

        Resolved on first use, not at decoration, so forward references defined later in the module work.
        """
        if self._payload_type is _UNSET:
            self._payload_type = _payload_type_of(self.fn)
        return self._payload_type

    def decoder(self) -> msgspec.msgpack.Decoder[Any]:
        """The msgpack decoder for this processor's payload type (built once)."""
        if self._decoder is None:
            self._decoder = msgspec.msgpack.Decoder(self.payload_type)
        return self._decoder

    def decode_payload(self, data: bytes) -> T:
        """Decode a stored payload; any malformed input becomes a ``PayloadError``."""
        try:
            return typing.cast("T", self.decoder().decode(data))
        except DECODE_ERRORS as exc:
            raise PayloadError(
                f"payload of job {self.queue.name}:{self.name} cannot be decoded as "
                f"{_type_name(self.payload_type)}: {type(exc).__name__}: {exc}"
            ) from exc

    def validate(self, payload: Any) -> tuple[T, bytes]:
        """Check ``payload`` against the payload type; return it (converted) and its encoding."""
        what = f"job {self.queue.name}:{self.name}"
        typ = self.payload_type
        value = payload
        if typ is not Any:
            try:
                value = msgspec.convert(payload, typ, from_attributes=True)
            except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
                raise PayloadError(
                    f"{what}: payload does not match {_type_name(typ)}: {exc} (got {_short(payload)})"
                ) from exc
        data = encode_payload(value, limit=self.queue.app.max_payload_bytes, what=what)
        return typing.cast("T", value), data

    async def add(
        self,
        payload: T,
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
    ) -> Job[T]:
        """Add a job for this processor: the typed twin of ``queue.add(name, payload, ...)``.

        mypy and pyright check ``payload`` against the handler's ``Job[X]``; the arguments are as for
        ``Queue.add``.
        """
        job = await self.queue.add(
            self.name,
            payload,
            job_id=job_id,
            delay=delay,
            run_at=run_at,
            options=job_options(options, attempts=attempts, timeout=timeout, backoff=backoff),
            expires=expires,
            dedup=dedup,
        )
        return typing.cast("Job[T]", job)

    async def enqueue(
        self,
        payload: T,
        *,
        job_id: str | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        attempts: int | None = None,
        timeout: float | None = None,
        backoff: Backoff | None = None,
        options: JobOptions | None = None,
    ) -> Job[T]:
        """Deprecated: the old name of ``add`` (one verb for enqueueing); emits ``DeprecationWarning``."""
        warnings.warn(
            "Processor.enqueue() is deprecated, use Processor.add() (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        return await self.add(
            payload,
            job_id=job_id,
            delay=delay,
            run_at=run_at,
            attempts=attempts,
            timeout=timeout,
            backoff=backoff,
            options=options,
        )

    async def run(self, job: Job[T]) -> R:
        """Call the handler directly in this coroutine (no queue, no worker): handy in unit tests.

        A sync handler runs in a worker thread, as it would in a worker process.
        """
        if self.is_async:
            return await typing.cast("Callable[[Job[T]], Awaitable[R]]", self.fn)(job)
        import anyio.to_thread

        return await anyio.to_thread.run_sync(typing.cast("Callable[[Job[T]], R]", self.fn), job)


def _payload_type_of(fn: Callable[..., Any]) -> Any:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise ConfigurationError(f"cannot resolve the type hints of processor {fn!r}: {exc}") from exc
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise ConfigurationError(f"processor {fn!r} must take one argument: the job")
    hint = hints.get(params[0].name)
    if hint is None or hint is Job:
        return Any
    if typing.get_origin(hint) is Job:
        (arg,) = typing.get_args(hint)
        return Any if isinstance(arg, TypeVar) else arg
    raise ConfigurationError(
        f"processor {fn.__qualname__}: annotate its argument as qflow.Job[PayloadType], got {hint!r}"
    )


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or repr(typ)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
