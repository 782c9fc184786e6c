"""Repeatable jobs, the producer side: declaring them in code, upserting, removing and listing them by id.

A schedule belongs to a queue and says which job to create (processor name, payload, option overrides) and
when: a cron expression in a time zone, or a fixed interval (``qflow._cron``). It is stored in Redis under
the queue's hash tag (``keys.ScheduleKeys``) and fired by the scheduler inside every worker process that
runs the queue (``qflow._worker.scheduler``): no separate beat process. ``@queue.cron(...)`` only records a
declaration; a worker upserts its queues' declarations when it starts. ``await queue.schedule(...)`` upserts
from any process at once.

An upsert is by id and idempotent: the same spec and payload again change nothing, so every worker process
of a fleet can upsert the same declarations at start. A changed spec or payload takes a new version and
restarts at the next tick after the change.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, cast, get_args, overload

import msgspec

from . import _codec
from ._broker import commands, scripts_schedule
from ._cron import Cron, Interval, Ticks
from ._job import Job
from ._options import JobOptions
from ._processor import Processor
from ._settings import MAX_SECONDS, check_number
from .exceptions import ConfigurationError, PayloadError

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ._queue import Queue

__all__ = (
    "DEFAULT_MISFIRE_GRACE",
    "CronDecorator",
    "Declared",
    "Misfire",
    "Prepared",
    "Schedule",
    "ScheduleMethods",
    "ScheduleSpec",
    "declare",
    "decode_spec",
    "job_id",
    "list_schedules",
    "prepare",
    "unschedule",
    "upsert",
)

T = TypeVar("T")
R = TypeVar("R")

Misfire = Literal["run_once", "skip"]
"""What a schedule does with the ticks that came due while no worker process fired them.

- ``run_once`` (the default): one job, for the latest due tick, however late; the earlier ones get none.
- ``skip``: the latest due tick gets its job only if it is fired within ``misfire_grace`` of its time; the
  earlier ones get none.
"""

DEFAULT_MISFIRE_GRACE: Final = 60.0
"""Seconds a tick may be late and still run under ``misfire="skip"`` (Quartz's misfire threshold)."""

MIN_EVERY: Final = 0.1
"""Shortest interval (seconds): every worker process running the queue calls ``fire`` at every tick."""

_ID = re.compile(r"^[A-Za-z0-9_.\-:]{1,128}$")


class ScheduleSpec(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """When a schedule fires and what it does with missed ticks, as stored (its version is kept apart).

    Encoded deterministically, so an upsert of the same declaration from another process compares equal.
    """

    name: str
    """The processor name of the job each tick creates."""
    cron: str | None
    every_ms: int | None
    tz: str
    misfire: str
    grace_ms: int

    def ticks(self) -> Ticks:
        """The schedule's ticks (``ConfigurationError`` for a cron expression without the cron extra)."""
        if self.cron is not None:
            return Cron(self.cron, self.tz)
        if self.every_ms is None:
            raise ConfigurationError("a schedule needs cron= or every=")
        return Interval(self.every_ms)

    @property
    def grace(self) -> int:
        """What ``fire`` takes: -1 for ``run_once`` (however late), else the grace in ms."""
        return -1 if self.misfire == "run_once" else self.grace_ms


_spec_encoder: Final = msgspec.msgpack.Encoder()
_spec_decoder: Final = msgspec.msgpack.Decoder(ScheduleSpec)


def decode_spec(data: bytes) -> ScheduleSpec:
    """A stored spec; ``PayloadError`` if the bytes are not one."""
    try:
        return _spec_decoder.decode(data)
    except _codec.DECODE_ERRORS as exc:
        raise PayloadError(f"stored schedule spec cannot be decoded: {type(exc).__name__}: {exc}") from exc


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule as stored in Redis, read at one instant (``Queue.schedules``, ``qflow schedules``).

    Times are Unix seconds on the Redis server's clock.
    """

    queue: str
    id: str
    name: str
    """The processor name of the job each tick creates."""
    cron: str | None
    """The cron expression (None for an interval)."""
    every: float | None
    """The interval in seconds (None for a cron expression)."""
    tz: str
    """The time zone a cron expression is read in."""
    misfire: str
    """``run_once``: the latest of the ticks missed while no worker fired them gets one job, however late;
    ``skip``: it gets one only within ``misfire_grace`` of its time. Earlier missed ticks never get one."""
    misfire_grace: float
    """Seconds a tick may be late and still run under ``skip``."""
    next_run: float | None
    """The next tick; None when the schedule has no more."""
    last_tick: float | None = None
    """The tick fired last (None: none yet); a job was created for it unless the misfire policy dropped it."""
    fired: int = 0
    """Jobs the schedule created."""
    missed: int = 0
    """Ticks that got no job (came due while nothing fired them, or dropped under ``skip``)."""
    version: int = 0
    """A new number at every change of the spec or payload (from a counter of the queue, never reused)."""
    payload: Any = None
    """The payload of each tick's job, as plain data (only when read with payloads)."""

    def describe(self) -> str:
        """``cron */5 * * * * (Europe/Berlin)`` or ``every 60s``."""
        if self.cron is not None:
            return f"cron {self.cron}" + ("" if self.tz == "UTC" else f" ({self.tz})")
        return f"every {self.every or 0:g}s"


def job_id(schedule_id: str, tick_ms: int) -> str:
    """The id of the job a schedule creates for a tick: a second try at the same tick finds it taken."""
    return f"sched:{schedule_id}:{tick_ms}"


def check_id(schedule_id: object) -> str:
    """``schedule_id`` if it can name a schedule, else ``ConfigurationError``."""
    if not isinstance(schedule_id, str) or not _ID.match(schedule_id):
        raise ConfigurationError(
            f"invalid schedule id {schedule_id!r}: use 1-128 characters from A-Z a-z 0-9 _ . - :"
        )
    return schedule_id


def make_spec(
    name: str,
    *,
    cron: str | None,
    every: float | timedelta | None,
    tz: str,
    misfire: str,
    misfire_grace: float,
) -> ScheduleSpec:
    """Check the timing arguments of a schedule; the spec, its ticks parsed once to prove them."""
    if (cron is None) == (every is None):
        raise ConfigurationError("give a schedule cron= or every= (exactly one)")
    if misfire not in get_args(Misfire):
        raise ConfigurationError(f"misfire must be one of {', '.join(get_args(Misfire))}, got {misfire!r}")
    check_number("misfire_grace", misfire_grace, ge=0, le=MAX_SECONDS, unit="seconds")
    every_ms = None
    if every is not None:
        seconds = every.total_seconds() if isinstance(every, timedelta) else every
        check_number("every", seconds, ge=MIN_EVERY, le=MAX_SECONDS, unit="seconds")
        every_ms = round(seconds * 1000)
    elif not isinstance(cron, str):
        raise ConfigurationError(f"cron must be a str such as '*/5 * * * *', got {cron!r}")
    else:
        cron = " ".join(cron.split())
    if not isinstance(tz, str):
        raise ConfigurationError(f"tz must be an IANA time zone name such as 'Europe/Berlin', got {tz!r}")
    spec = ScheduleSpec(name, cron, every_ms, tz, misfire, round(misfire_grace * 1000))
    if cron is None and tz != "UTC":
        raise ConfigurationError("tz= is for cron expressions; every= ticks at fixed instants")
    spec.ticks()  # parses a cron expression and the zone: ConfigurationError now, not in a worker
    return spec


class Prepared(msgspec.Struct, frozen=True):
    """A schedule checked and encoded, ready for ``upsert``."""

    id: str
    spec: ScheduleSpec
    spec_bytes: bytes
    envelope: bytes


def prepare(
    queue: Queue,
    schedule_id: str,
    name: str,
    payload: Any,
    *,
    cron: str | None,
    every: float | timedelta | None,
    tz: str,
    misfire: str,
    misfire_grace: float,
    options: JobOptions | None,
) -> Prepared:
    """Check and encode a schedule of ``queue``; nothing is written. The job is checked as ``add`` checks
    it (processor name, payload type, options)."""
    check_id(schedule_id)
    spec = make_spec(name, cron=cron, every=every, tz=tz, misfire=misfire, misfire_grace=misfire_grace)
    return Prepared(schedule_id, spec, _spec_encoder.encode(spec), queue._envelope(name, payload, options))


async def upsert(queue: Queue, prepared: Prepared, *, client: aioredis.Redis | None = None) -> Schedule:
    """Store a prepared schedule (two round trips: the server's time, then the script); return it.

    ``client``: a worker passes its own (default: ``app.redis()``).
    """
    client = client or queue.app.redis()
    now = await commands.server_ms(client)
    first = prepared.spec.ticks().after(now)
    if first is None:
        raise ConfigurationError(f"schedule {prepared.id!r} has no tick after now: it would never fire")
    done = await scripts_schedule.upsert(
        client, queue.keys, prepared.id, prepared.spec_bytes, prepared.envelope, first
    )
    return _schedule(queue.name, prepared.id, prepared.spec, version=done.version, cursor=done.cursor)


async def unschedule(queue: Queue, schedule_id: str) -> bool:
    """Delete a schedule by id; True if it existed. Jobs it created are left alone."""
    return await scripts_schedule.remove(queue.app.redis(), queue.keys, check_id(schedule_id))


async def list_schedules(queue: Queue, *, payloads: bool = False) -> list[Schedule]:
    """Every schedule of ``queue`` as stored, sorted by id (one round trip)."""
    _now, stored = await scripts_schedule.read(queue.app.redis(), queue.keys, with_envelopes=payloads)
    out = []
    for s in sorted(stored, key=lambda s: s.id):
        try:
            spec = decode_spec(s.spec)
        except PayloadError:
            spec = ScheduleSpec("?", "<undecodable>", None, "UTC", "?", 0)
        payload = None
        if s.envelope is not None:
            try:
                payload = _codec.decode_any(_codec.decode_envelope(s.envelope).payload)
            except (PayloadError, *_codec.DECODE_ERRORS) as exc:
                payload = f"<undecodable: {exc}>"
        info = _schedule(queue.name, s.id, spec, version=s.version, cursor=s.cursor, last=s.last)
        out.append(msgspec.structs.replace(info, fired=s.fired, missed=s.missed, payload=payload))
    return out


def _schedule(
    queue: str,
    schedule_id: str,
    spec: ScheduleSpec,
    *,
    version: int,
    cursor: int | None,
    last: int | None = None,
) -> Schedule:
    return Schedule(
        queue=queue,
        id=schedule_id,
        name=spec.name,
        cron=spec.cron,
        every=None if spec.every_ms is None else spec.every_ms / 1000,
        tz=spec.tz,
        misfire=spec.misfire,
        misfire_grace=spec.grace_ms / 1000,
        next_run=None if cursor is None else cursor / 1000,
        last_tick=None if last is None else last / 1000,
        version=version,
    )


# -- declarations in code: @queue.cron(...) -----------------------------------------------------------------


class Declared(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule declared in code with ``@queue.cron``: upserted by each worker process at its start."""

    id: str
    name: str
    payload: Any
    cron: str | None
    every: float | None
    tz: str
    misfire: str
    misfire_grace: float
    options: JobOptions | None

    def prepare(self, queue: Queue) -> Prepared:
        """Check and encode it for ``queue`` (its payload against the processor's type)."""
        return prepare(
            queue,
            self.id,
            self.name,
            self.payload,
            cron=self.cron,
            every=self.every,
            tz=self.tz,
            misfire=self.misfire,
            misfire_grace=self.misfire_grace,
            options=self.options,
        )


def declare(
    queue: Queue,
    proc: Processor[Any, Any],
    *,
    schedule_id: str | None,
    payload: Any,
    cron: str | None,
    every: float | timedelta | None,
    tz: str,
    misfire: str,
    misfire_grace: float,
    options: JobOptions | None,
) -> Declared:
    """Record a declaration on ``queue`` for processor ``proc``; its timing is checked now (a bad cron
    expression, or one without the cron extra, fails at import), its payload when a worker starts."""
    sid = check_id(proc.name if schedule_id is None else schedule_id)
    if proc.queue is not queue:
        raise ConfigurationError(f"{proc!r} is a processor of queue {proc.queue.name!r}, not {queue.name!r}")
    if sid in queue._declared:
        raise ConfigurationError(f"queue {queue.name!r} already declares a schedule {sid!r}: give id=")
    if options is not None and not isinstance(options, JobOptions):
        raise ConfigurationError(f"options must be a qflow.JobOptions or None, got {options!r}")
    spec = make_spec(proc.name, cron=cron, every=every, tz=tz, misfire=misfire, misfire_grace=misfire_grace)
    decl = Declared(
        id=sid,
        name=proc.name,
        payload=payload,
        cron=spec.cron,
        every=None if spec.every_ms is None else spec.every_ms / 1000,
        tz=tz,
        misfire=misfire,
        misfire_grace=misfire_grace,
        options=options,
    )
    queue._declared[sid] = decl
    return decl


class CronDecorator:
    """What ``queue.cron(...)`` returns: apply it to a processor (or to a handler, which it registers)."""

    def __init__(self, attach: Callable[[Processor[Any, Any]], None], register: Callable[[Any], Any]) -> None:
        self._attach = attach
        self._register = register

    @overload
    def __call__(self, target: Processor[T, R], /) -> Processor[T, R]: ...

    @overload
    def __call__(self, target: Callable[[Job[T]], Awaitable[R]], /) -> Processor[T, R]: ...

    @overload
    def __call__(self, target: Callable[[Job[T]], R], /) -> Processor[T, R]: ...

    def __call__(self, target: Any, /) -> Processor[Any, Any]:
        proc = target if isinstance(target, Processor) else self._register(target)
        self._attach(proc)
        return proc


class ScheduleMethods:
    """``Queue``'s repeatable-job methods (a mixin, so ``_queue`` stays one module of one job)."""

    __slots__ = ()

    def cron(
        self,
        expr: str | None = None,
        /,
        *,
        every: float | timedelta | None = None,
        id: str | None = None,
        payload: Any = None,
        tz: str = "UTC",
        misfire: Misfire = "run_once",
        misfire_grace: float = DEFAULT_MISFIRE_GRACE,
        options: JobOptions | None = None,
    ) -> CronDecorator:
        """Declare a repeatable job for a processor of this queue: on ``expr``'s ticks, or ``every`` seconds.

        Stack it on ``@queue.processor`` (or put it on a handler alone: it registers one with defaults).
        ``expr`` is a cron expression in time zone ``tz`` (5 fields, or 6 with seconds first; needs
        ``pip install 'qflow[cron]'``); ``every`` a fixed interval, at the multiples of it since the Unix
        epoch. Each tick creates one job with ``payload`` (and ``options`` overriding the processor's), once
        fleet-wide. ``id`` defaults to the processor's name. ``misfire`` (``run_once`` or ``skip``, see
        ``qflow.Schedule.misfire``) and ``misfire_grace`` say what becomes of ticks missed while no worker
        ran. Declaring starts nothing and does no I/O: each worker process that runs the queue upserts its
        queue's declarations when it starts (the same declaration again changes nothing). Bad timing
        arguments raise ``ConfigurationError`` here; a bad payload when a worker starts.
        """

        queue = cast("Queue", self)

        def attach(proc: Processor[Any, Any]) -> None:
            declare(
                queue,
                proc,
                schedule_id=id,
                payload=payload,
                cron=expr,
                every=every,
                tz=tz,
                misfire=misfire,
                misfire_grace=misfire_grace,
                options=options,
            )

        return CronDecorator(attach, queue.processor)

    async def schedule(
        self,
        id: str,
        name: str | None = None,
        payload: Any = None,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        tz: str = "UTC",
        misfire: Misfire = "run_once",
        misfire_grace: float = DEFAULT_MISFIRE_GRACE,
        options: JobOptions | None = None,
    ) -> Schedule:
        """Create or change the schedule ``id`` of this queue, from any process; return it as stored.

        Each tick of ``cron`` (in ``tz``) or of ``every`` creates one job called ``name`` (default: ``id``)
        with ``payload``, once fleet-wide, fired by the worker processes running this queue. The same
        arguments again change nothing; changed ones take effect from the next tick after the change. The
        arguments are those of ``cron()``; they and the job are checked as ``add`` checks a job, before
        anything is written (``ConfigurationError``, ``PayloadError``, ``UnknownJobName``).
        """
        queue = cast("Queue", self)
        prepared = prepare(
            queue,
            id,
            id if name is None else name,
            payload,
            cron=cron,
            every=every,
            tz=tz,
            misfire=misfire,
            misfire_grace=misfire_grace,
            options=options,
        )
        return await upsert(queue, prepared)

    async def unschedule(self, id: str) -> bool:
        """Delete the schedule ``id`` of this queue; True if it existed. Jobs it already created stay.

        A schedule declared with ``@queue.cron`` comes back when a worker running that code starts: remove
        the declaration first.
        """
        return await unschedule(cast("Queue", self), id)

    async def schedules(self, *, payloads: bool = False) -> list[Schedule]:
        """Every schedule of this queue as stored in Redis, by id (each job's payload too if ``payloads``)."""
        return await list_schedules(cast("Queue", self), payloads=payloads)

    @property
    def declared_schedules(self) -> dict[str, Declared]:
        """Schedules declared on this queue with ``@queue.cron``, by id (a copy; not read from Redis)."""
        return dict(cast("Queue", self)._declared)
