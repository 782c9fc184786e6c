"""Option groups, as frozen msgspec Structs (validated on construction), and the number check they share.

A bad value raises ``ConfigurationError`` (a ``QflowError`` and a ``ValueError``) naming the field, the
value and the range. Every number is checked finite: it reaches timers and Lua scripts (docs/DESIGN).
"""

from __future__ import annotations

import math

import msgspec

from .exceptions import ConfigurationError

__all__ = ("RetentionSettings", "WorkerSettings", "check_number")


def check_number(
    what: str,
    value: object,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    unit: str = "",
) -> None:
    """Raise ``ConfigurationError`` unless ``value`` is a finite number (an int if ``integer``) in range.

    ``bool`` is refused although it is an ``int``: ``attempts=True`` is a mistake, not 1.
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
        bounds = [f">= {ge:g}" if ge is not None else "", f"> {gt:g}" if gt is not None else ""]
        bounds.append(f"<= {le:g}" if le is not None else "")
        wanted = "an int" if integer else "a finite number"
        rng = " and ".join(b for b in bounds if b)
        suffix = f" ({unit})" if unit else ""
        raise ConfigurationError(f"{what} must be {wanted}{' ' + rng if rng else ''}{suffix}, got {value!r}")


class WorkerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Timing of one worker process. Defaults suit production; tests shrink them (see ``qflow.testing``).

    - ``lease_ttl``: seconds a delivery stays owned without renewal; renewed every ``lease_ttl / 3``.
    - ``check_interval``: how often the stalled-job check runs (one checker acts per interval fleet-wide).
      A job whose worker died is runnable again within ``lease_ttl + check_interval``.
    - ``max_stalls``: crash recoveries a job may take before it fails with reason ``stalled``.
    - ``drain_timeout``: on a graceful stop, how long in-flight jobs may finish before they are released.
    - ``block_timeout``: how long an idle fetcher blocks on the server before looking again (at most 80% of
      the app's ``socket_timeout``, which is what detects a dead server).
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
        check_number("lease_ttl", self.lease_ttl, ge=0.3, unit="seconds")
        check_number("check_interval", self.check_interval, ge=0.05, unit="seconds")
        check_number("max_stalls", self.max_stalls, ge=0, integer=True)
        check_number("drain_timeout", self.drain_timeout, ge=0, unit="seconds")
        check_number("block_timeout", self.block_timeout, ge=0.01, le=60, unit="seconds")
        check_number("claim_batch", self.claim_batch, ge=1, integer=True)
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
        check_number("retention completed_count", self.completed_count, ge=0, integer=True)
        check_number("retention failed_count", self.failed_count, ge=0, integer=True)
        for name, age in (("completed_age", self.completed_age), ("failed_age", self.failed_age)):
            if age is not None:
                check_number(f"retention {name}", age, ge=0, unit="seconds, or None for no age limit")
