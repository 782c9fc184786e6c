"""When a job may run and until when it may start: ``run_at=`` and ``expires=`` as the add script takes them.

Pure: no Redis. Times become Unix milliseconds (absolute) or milliseconds from the add (relative, timed by
the Redis server's clock in the script); every number is checked finite and bounded where it enters.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from ._settings import MAX_SECONDS, check_number
from .exceptions import ConfigurationError

__all__ = ("LAST_RUN_AT_MS", "Expires", "expiry_ms", "run_at_ms")

LAST_RUN_AT_MS = 253_402_300_800_000
"""The end of year 9999 (``datetime.max``) in Unix ms: a ``run_at`` is never later, and is exact in Lua."""

Expires = float | timedelta | datetime
"""What ``add(expires=)`` takes: seconds from the add, a ``timedelta`` from the add, or an aware datetime."""


def run_at_ms(run_at: object, what: str = "run_at") -> int:
    """``run_at`` (an aware datetime) in Unix ms, as the add script takes it; 0 for any time before 1970."""
    if not isinstance(run_at, datetime):
        raise ConfigurationError(f"{what} must be a datetime, got {run_at!r}")
    try:
        # A tzinfo's utcoffset() may raise, or return something not a timedelta; a datetime subclass may
        # return nan or a huge number from timestamp(): all refused here, never a bare error later.
        ms = None if run_at.utcoffset() is None else int(run_at.timestamp() * 1000)
    except (ValueError, OverflowError, TypeError) as exc:
        raise ConfigurationError(f"{what} {run_at!r} has no usable time: {exc!r}") from exc
    if ms is None:
        raise ConfigurationError(f"{what} must be timezone-aware (e.g. datetime.now(UTC))")
    if ms > LAST_RUN_AT_MS:
        raise ConfigurationError(f"{what} must be before the year 10000, got {run_at!r}")
    # datetime spans years 1 to 9999, so ms fits a Lua double exactly. A time before 1970 is in the past
    # like any other: 0 (no run_at) lets the job wait at once, as a past run_at does.
    return max(ms, 0)


def expiry_ms(expires: object) -> tuple[int, int]:
    """``expires`` as the add script takes it: (ms from the add, 0) or (0, Unix ms); (0, 0) for None.

    Seconds or a ``timedelta`` count from the add, on the server's clock: more than 0, at most
    ``MAX_SECONDS``. An aware datetime is absolute; one already past (before 1970 too) expires the job at its
    first claim.
    """
    if expires is None:
        return 0, 0
    if isinstance(expires, datetime):
        return 0, max(run_at_ms(expires, "expires"), 1)
    seconds = expires.total_seconds() if isinstance(expires, timedelta) else expires
    if not (type(seconds) in (float, int) and 0 < seconds <= MAX_SECONDS):  # type: ignore[operator]
        check_number(
            "expires", seconds, gt=0, le=MAX_SECONDS, unit="seconds, a timedelta, or an aware datetime"
        )
    return max(int(seconds * 1000), 1), 0  # type: ignore[operator]
