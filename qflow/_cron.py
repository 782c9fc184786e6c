"""When a repeatable job is due: the ticks of a cron expression or of a fixed interval. Pure: no I/O.

No clock either: every time here is Unix milliseconds, and the caller takes "now" from the Redis server
(DESIGN.md). A tick depends only on the schedule and on the instant it follows, never on the clock of the
process computing it, so every worker process computes the same ticks.

- ``Interval(every_ms)``: ticks at the multiples of ``every_ms`` since the Unix epoch (UTC). Aligned, not
  anchored at the time of the upsert, so re-declaring a schedule from another process moves nothing (the
  fix BullMQ made for its duplicate scheduler jobs, taskforcesh/bullmq#2991).
- ``Cron(expr, tz)``: a cron expression in an IANA time zone, parsed and iterated by cronsim (the ``cron``
  extra): five fields, or six with seconds first (``*/10 * * * * *``), or an alias (``@hourly``...).

Daylight saving time, one rule for five and six fields (cron(8), cronie, and cronsim's own for five):
a *fixed-time* expression, whose minute and hour fields both start with something other than ``*``
(``30 2 * * *``, ``0 9,17 * * 1-5``), runs by the wall clock: once on the day a local time repeats (at its
first occurrence), and at the first minute after the gap on the day that time does not exist (02:30 runs
at 03:00). Any other expression (``*/15 * * * *``, ``0 * * * *``) runs at every matching instant: the
repeated hour's ticks run twice, being distinct instants, and the skipped hour's ticks do not exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Protocol

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from cronsim import CronSim

__all__ = (
    "CATCH_UP_LIMIT",
    "CRON_EXTRA_HINT",
    "Cron",
    "Due",
    "Interval",
    "Ticks",
    "check_tz",
    "due",
)

CATCH_UP_LIMIT = 10_000
"""Most missed ticks ``due`` steps through one at a time (a few ms to 0.6 s of CPU, measured with cronsim
2.8); past that it jumps to the latest due tick and reports the count as a lower bound."""

CRON_EXTRA_HINT = "cron expressions need the cron parser: pip install 'qflow[cron]' (every= needs nothing)"

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""The usual cron aliases, spelled out (cronsim takes fields only)."""

_GUARD = 10_000
"""Most parser results one step passes over before giving up. Only a fixed-time walk passes any over: the
wall-clock matches of the repeated hour that lie on the wrong side of its start, at most the matches of two
hours (the longest DST shift)."""


class Ticks(Protocol):
    """The instants a schedule fires at, in Unix ms."""

    def after(self, ms: int) -> int | None:
        """The first tick strictly after ``ms``; None if there is none (a cron that never matches again)."""
        ...

    def latest(self, ms: int) -> int | None:
        """The latest tick at or before ``ms``; None if there is none."""
        ...

    def iter_after(self, ms: int) -> Iterator[int]:
        """The ticks strictly after ``ms``, in order."""
        ...


@dataclass(frozen=True, slots=True)
class Interval:
    """Ticks every ``every_ms`` milliseconds, at the multiples of ``every_ms`` since the Unix epoch."""

    every_ms: int

    def __post_init__(self) -> None:
        if not (isinstance(self.every_ms, int) and self.every_ms >= 1):
            raise ConfigurationError(f"an interval must be a whole number of ms >= 1, got {self.every_ms!r}")

    def after(self, ms: int) -> int:
        """The first multiple of ``every_ms`` strictly after ``ms``."""
        return (ms // self.every_ms + 1) * self.every_ms

    def latest(self, ms: int) -> int:
        """The last multiple of ``every_ms`` at or before ``ms``."""
        return ms // self.every_ms * self.every_ms

    def iter_after(self, ms: int) -> Iterator[int]:
        tick = self.after(ms)
        while True:
            yield tick
            tick += self.every_ms


@dataclass(frozen=True, slots=True)
class Cron:
    """Ticks of cron expression ``expr`` read in time zone ``tz`` (an IANA name, e.g. ``Europe/Berlin``).

    Raises ``ConfigurationError`` for an expression cronsim refuses, an unknown zone, or without the
    ``cron`` extra installed.
    """

    expr: str
    tz: str = "UTC"
    normalized: str = field(init=False, repr=False, compare=False)
    """``expr`` with an alias spelled out: what cronsim parses."""
    fixed: bool = field(init=False, repr=False, compare=False)
    """Whether this is a fixed-time expression (module docstring): it runs by the wall clock across DST."""
    zone: tzinfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.expr, str) or not self.expr.strip():
            raise ConfigurationError(f"a cron expression must be a non-empty str, got {self.expr!r}")
        text = " ".join(self.expr.split())
        fields = ALIASES.get(text.lower(), text)
        parts = fields.split()
        object.__setattr__(self, "normalized", fields)
        object.__setattr__(self, "zone", check_tz(self.tz))
        if len(parts) not in (5, 6):
            raise ConfigurationError(
                f"cron expression {self.expr!r} has {len(parts)} fields: give 5 (minute hour day month "
                "weekday), 6 with seconds first (second minute hour day month weekday), or an alias "
                f"({', '.join(ALIASES)})"
            )
        minute, hour = parts[-5], parts[-4]
        object.__setattr__(self, "fixed", not minute.startswith("*") and not hour.startswith("*"))
        parser, error = _parser()
        try:
            next(parser(fields, datetime(2000, 1, 1, tzinfo=UTC)))  # it gives up after 50 years of nothing
        except error as exc:
            raise ConfigurationError(f"invalid cron expression {self.expr!r}: {exc}") from None
        except StopIteration:
            raise ConfigurationError(f"cron expression {self.expr!r} never matches a date") from None

    def after(self, ms: int) -> int | None:
        """The first tick strictly after ``ms``."""
        return next(self.iter_after(ms), None)

    def iter_after(self, ms: int) -> Iterator[int]:
        """The ticks strictly after ``ms``, in order (each strictly later than the one before)."""
        return self._walk(ms, reverse=False)

    def latest(self, ms: int) -> int | None:
        """The latest tick at or before ``ms``."""
        return next(self._walk(ms, reverse=True), None)

    def _walk(self, ms: int, *, reverse: bool) -> Iterator[int]:
        """Ticks after ``ms`` (or at/before it, going back), from cronsim's matches.

        cronsim steps in whole seconds from the second that holds ``ms``: forward it yields matches after
        that second (all after ``ms``), backward matches before it, so the walk back starts one second on.
        Each match becomes an instant; only strictly monotonic instants are yielded, which passes over the
        wall-clock times a fixed-time walk meets twice or maps to one instant.
        """
        start = datetime.fromtimestamp(ms // 1000 + (1 if reverse else 0), self.zone)
        if self.fixed:
            # Wall-clock iteration (a naive datetime: cronsim does no time zone arithmetic), each time then
            # placed on the clock at its first occurrence, or just after the gap (module docstring).
            wall = start.replace(tzinfo=None)
            if reverse and start.fold:
                # In the repeated hour's second pass the first pass's times are behind us though the wall
                # clock has not reached them: walk back from where the first pass's clock stands now.
                first_pass = start.replace(fold=0).utcoffset() or timedelta()
                wall += first_pass - (start.utcoffset() or timedelta())
            matches = self._cronsim(wall, reverse)
        else:
            matches = self._cronsim(start, reverse)
        last = ms + 1 if reverse else ms
        passed = 0
        for match in matches:
            tick = _instant_ms(match, self.zone)
            if (tick < last) if reverse else (tick > last):
                passed = 0
                last = tick
                yield tick
            else:
                passed += 1
                if passed > _GUARD:
                    return

    def _cronsim(self, start: datetime, reverse: bool) -> CronSim:
        return _parser()[0](self.normalized, start, reverse=reverse)


def check_tz(name: object) -> tzinfo:
    """The time zone called ``name`` (an IANA name such as ``Europe/Berlin``, or ``UTC``)."""
    if name == "UTC":
        return UTC
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"tz must be an IANA time zone name such as 'Europe/Berlin', got {name!r}")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"unknown time zone {name!r}: {exc} (an IANA name such as 'Europe/Berlin'; where the system "
            "has no time zone database, pip install tzdata)"
        ) from None


@dataclass(frozen=True, slots=True)
class Due:
    """What is due at some instant for a schedule whose next tick is ``cursor`` (``due``)."""

    tick: int
    """The latest tick at or before the instant: the one a job is created for."""
    skipped: int
    """Ticks from ``cursor`` up to ``tick`` (excluded): missed, never run (a lower bound if ``capped``)."""
    next: int | None
    """The first tick after ``tick``: where the cursor goes once ``tick`` is fired (None: no more)."""
    capped: bool = False
    """More than ``CATCH_UP_LIMIT`` ticks were due: ``skipped`` stopped counting there."""


def due(ticks: Ticks, cursor: int, now: int) -> Due | None:
    """What firing at ``now`` means for a schedule whose next tick is ``cursor``; None if not due yet.

    All the ticks from ``cursor`` to ``now`` collapse into one: the latest (``Due.tick``). The misfire policy
    decides whether it gets a job; the earlier ones never do (no burst of jobs after an outage).
    """
    if cursor > now:
        return None
    if isinstance(ticks, Interval):
        tick = ticks.latest(now)
        return Due(tick, (tick - cursor) // ticks.every_ms, tick + ticks.every_ms)
    tick, skipped = cursor, 0
    for nxt in ticks.iter_after(cursor):
        if nxt > now:
            return Due(tick, skipped, nxt)
        if skipped == CATCH_UP_LIMIT:
            break
        tick, skipped = nxt, skipped + 1
    else:
        return Due(tick, skipped, None)
    latest = ticks.latest(now)
    tick = tick if latest is None or latest < tick else latest
    return Due(tick, skipped, ticks.after(tick), capped=True)


def _instant_ms(match: datetime, zone: tzinfo) -> int:
    """Unix ms of a cronsim match: an aware one as it is; a naive (wall-clock) one at its first occurrence,
    or, when that local time does not exist, at the same time one minute on, then the next, until it does."""
    if match.tzinfo is None:
        local = match.replace(tzinfo=zone, fold=0)
        for _ in range(24 * 60):  # no gap is longer than a day
            if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):
                break
            local += timedelta(minutes=1)
        match = local
    return int(match.timestamp()) * 1000


def _parser() -> tuple[type[CronSim], type[Exception]]:
    """cronsim's iterator and error classes, or a ``ConfigurationError`` naming the extra to install."""
    try:
        from cronsim import CronSim, CronSimError
    except ImportError:
        raise ConfigurationError(CRON_EXTRA_HINT) from None
    return CronSim, CronSimError
