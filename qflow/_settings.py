"""Option groups, as frozen msgspec Structs (validated on construction), and the number check they share.

A bad value raises ``ConfigurationError`` (a ``QflowError`` and a ``ValueError``) naming the field, the
value and the range. Every number is checked finite and at most a ``MAX_*`` bound: it reaches timers and
Lua scripts (docs/DESIGN).
"""

from __future__ import annotations

import math
from typing import Final

import msgspec

from .exceptions import ConfigurationError, QflowError

__all__ = (
    "MAX_ATTEMPTS",
    "MAX_CLAIM_BATCH",
    "MAX_CONCURRENCY",
    "MAX_COUNT",
    "MAX_SECONDS",
    "RetentionSettings",
    "WorkerSettings",
    "check_number",
)

# Upper bounds. Every number qflow takes reaches a timer (asyncio, a socket) or a Lua script, where numbers
# are doubles: an integer is exact there only below 2**53, and a float past ~1.8e305 turns into inf when made
# milliseconds (int(inf) raises OverflowError in the worker). The bounds keep each value, and each sum a
# script makes with it (server time + a duration), exact and finite, far from either limit.

MAX_SECONDS: Final = 100 * 365 * 24 * 3600
"""Longest duration qflow accepts (timeouts, delays, backoff, retention ages, leases): 100 years, i.e.
3,153,600,000 s. In milliseconds that is 3.2e12; added to the server's clock (about 1.8e12 ms today) it stays
below 2**53 ms (9.0e15) by three orders of magnitude, so every deadline a script computes is exact."""

MAX_ATTEMPTS: Final = 1_000_000
"""Most runs of one job (``attempts``), and most crash recoveries (``max_stalls``). Counted with HINCRBY and
compared in Lua; a million retries at the default backoff's one-hour cap is over a century, so a larger value
is a mistake, not a plan (msgpack cannot even store past 2**64)."""

MAX_COUNT: Final = 1_000_000_000
"""Most finished jobs a retention count keeps: a billion jobs is beyond any server's memory; below 2**53, so
the trimming scripts compute ranks exactly."""

MAX_CONCURRENCY: Final = 100_000
"""Most jobs one processor runs at once in one process: each unit is a lane task and a thread-limiter slot
made up front, so a huge value would exhaust memory before the first job."""

MAX_CLAIM_BATCH: Final = 10_000
"""Most jobs one claim script takes: one script call holds the server while it runs and its reply holds every
envelope (up to ``max_payload_bytes`` each) in memory at once."""


def _bound(value: float) -> str:
    """A bound as people read it: ``1,000,000`` for an integral one, else ``0.05``."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:g}"


def _shown(value: object) -> str:
    """``repr(value)``, short: a huge int has no repr past 4,300 digits (ValueError), a long one is cut."""
    try:
        text = repr(value)
    except ValueError:  # int_max_str_digits
        return f"an int of {value.bit_length():,} bits" if isinstance(value, int) else "an unprintable value"
    return text if len(text) <= 80 else text[:77] + "..."


def check_number(
    what: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    unit: str = "",
    error: type[QflowError] = ConfigurationError,
) -> None:
    """Raise ``error`` (``ConfigurationError``) unless ``value`` is a finite number (an int if ``integer``)
    in range; the message names ``what``, the range and the value.

    ``bool`` is refused although it is an ``int``: ``attempts=True`` is a mistake, not 1. Every caller gives
    an upper bound ``le`` (one of the ``MAX_*`` above) where the value reaches a timer or a script.
    """
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (isinstance(value, int) or not integer)
        and (isinstance(value, int) or math.isfinite(value))  # an int is finite (and may not fit a float)
        and (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
    )
    if not ok:
        bounds = [f">= {_bound(ge)}" if ge is not None else "", f"> {_bound(gt)}" if gt is not None else ""]
        bounds.append(f"<= {_bound(le)}" if le is not None else "")
        wanted = "an int" if integer else "a finite number"
        rng = " and ".join(b for b in bounds if b)
        suffix = f" ({unit})" if unit else ""
        raise error(f"{what} must be {wanted}{' ' + rng if rng else ''}{suffix}, got {_shown(value)}")


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Timing of one worker process. Defaults suit production; tests shrink them (see ``qflow.testing``).

    - ``lease_ttl``: seconds a delivery stays owned without renewal; renewed every ``lease_ttl / 3``.
    - ``check_interval``: how often the stalled-job check runs (one checker acts per interval fleet-wide).
      A job whose worker died is runnable again within ``lease_ttl + check_interval``.
    - ``max_stalls``: crash recoveries a job may take before it fails with reason ``stalled``.
    - ``drain_timeout``: on a graceful stop, how long in-flight jobs may finish before they are released.
    - ``block_timeout``: how long an idle fetcher blocks on the server before looking again (at most 80% of
      the app's ``socket_timeout``, which is what detects a dead server). New and due jobs do not wait for
      it: a new job wakes one idle fetcher, and one fetcher per queue holds the timer of the earliest
      delayed job. It bounds only how late a due job can be when the fetcher holding that timer died.
    - ``claim_batch``: most jobs one claim takes at once (bounded by free concurrency).
    - ``prefetch_window``: claim-ahead. While handlers are short, a worker claims up to as many jobs again
      as its concurrency ahead of time (leased and renewed like any other), sized so that a job claimed ahead
      is expected to start within this many seconds; jobs that run longer get no claim-ahead at all. On a
      graceful stop, claimed jobs that have not started are released at once. ``0`` turns it off.
    - ``claim_behind_wait``: an idle worker sends a one-job claim right behind its blocking wait, on the same
      connection, so the server runs it the moment a job arrives: pickup takes one round trip instead of two
      (about 0.4 ms less here). The price, and why it is off by default: an idle worker that freezes (a
      paused VM or container) or loses its network while it waits still takes that one job, which then waits
      for its lease to expire (``lease_ttl + check_interval``) instead of running elsewhere at once.

    A value out of range raises ``ConfigurationError``.
    """

    lease_ttl: float = 30.0
    check_interval: float = 5.0
    max_stalls: int = 2
    drain_timeout: float = 30.0
    block_timeout: float = 2.0
    claim_batch: int = 100
    prefetch_window: float = 0.05
    claim_behind_wait: bool = False

    def __post_init__(self) -> None:
        check_number("lease_ttl", self.lease_ttl, ge=0.3, le=MAX_SECONDS, unit="seconds")
        check_number("check_interval", self.check_interval, ge=0.05, le=MAX_SECONDS, unit="seconds")
        check_number("max_stalls", self.max_stalls, ge=0, le=MAX_ATTEMPTS, integer=True)
        check_number("drain_timeout", self.drain_timeout, ge=0, le=MAX_SECONDS, unit="seconds")
        check_number("block_timeout", self.block_timeout, ge=0.01, le=60, unit="seconds")
        check_number("claim_batch", self.claim_batch, ge=1, le=MAX_CLAIM_BATCH, integer=True)
        check_number("prefetch_window", self.prefetch_window, ge=0, le=60, unit="seconds")
        if not isinstance(self.claim_behind_wait, bool):
            raise ConfigurationError(f"claim_behind_wait must be a bool, got {self.claim_behind_wait!r}")


class RetentionSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How many finished jobs a queue keeps, and for how long (seconds; ``None`` = no age limit).

    Trimming happens inside the finishing scripts, a bounded number of jobs per call, so Redis memory stays
    bounded without a separate sweeper. A value out of range raises ``ConfigurationError``.
    """

    completed_count: int = 1000
    completed_age: float | None = 24 * 3600.0
    failed_count: int = 10_000
    failed_age: float | None = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        check_number("retention completed_count", self.completed_count, ge=0, le=MAX_COUNT, integer=True)
        check_number("retention failed_count", self.failed_count, ge=0, le=MAX_COUNT, integer=True)
        for name, age in (("completed_age", self.completed_age), ("failed_age", self.failed_age)):
            if age is not None:
                check_number(
                    f"retention {name}", age, ge=0, le=MAX_SECONDS, unit="seconds, or None for no age limit"
                )
