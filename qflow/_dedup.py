"""Deduplication modes (issue 14): ``Dedup``, given to ``add(dedup=)``, and ``AddOutcome``, what an add did.

Pure: no Redis. ``lua/dedup.lua`` carries the modes out atomically; docs/scheduling.md ("Deduplication")
explains them.
"""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Literal

import msgspec

from ._settings import MAX_SECONDS, check_number
from .exceptions import ConfigurationError

__all__ = ("AddOutcome", "Dedup")


class AddOutcome(enum.StrEnum):
    """What an ``add`` did, on ``Job.outcome`` of the handle it returned."""

    CREATED = "created"
    """A new job was created."""
    EXISTS = "exists"
    """A job with the given ``job_id`` existed: nothing was written."""
    THROTTLED = "throttled"
    """``Dedup(mode="throttle")``: the key was held, nothing was written; the handle is on the job that set
    the key."""
    DEBOUNCED = "debounced"
    """``Dedup(mode="debounce")``: the key's job had not started; its payload and options were replaced and
    its due time (and expiry) set anew from this add. The handle is on that job."""


_MODES = ("throttle", "debounce")


class Dedup(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A deduplication key for ``add(dedup=)``: adds with the same ``key`` on one queue within ``ttl``
    collapse into one job.

    - ``mode="throttle"``: the first add creates the job and holds the key for ``ttl``; later adds with the
      key are ignored and return that job (``AddOutcome.THROTTLED``), whatever became of it.
    - ``mode="debounce"``: while the key's job has not started (waiting or delayed), a later add replaces its
      payload and options, sets its due time from this add's ``delay``/``run_at`` and restarts the ``ttl``
      (``AddOutcome.DEBOUNCED``); once it started, the add creates a new job, which the key then names.

    ``key``: a non-empty str of at most 256 characters. ``ttl``: seconds or a ``timedelta``, more than 0,
    at most 100 years; the key lives that long in Redis, independent of job retention.
    """

    key: str
    ttl: float | timedelta
    mode: Literal["throttle", "debounce"] = "throttle"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key or len(self.key) > 256:
            raise ConfigurationError(f"Dedup key must be a non-empty str of <= 256 chars, got {self.key!r}")
        try:
            self.key.encode()
        except UnicodeEncodeError:
            raise ConfigurationError(f"Dedup key {self.key!r} has no UTF-8 form") from None
        if self.mode not in _MODES:
            raise ConfigurationError(f"Dedup mode must be 'throttle' or 'debounce', got {self.mode!r}")
        check_number("Dedup ttl", self.ttl_seconds, gt=0, le=MAX_SECONDS, unit="seconds or a timedelta")

    @property
    def ttl_seconds(self) -> object:
        """``ttl`` in seconds (a ``timedelta`` converted)."""
        return self.ttl.total_seconds() if isinstance(self.ttl, timedelta) else self.ttl

    @property
    def ttl_ms(self) -> int:
        """``ttl`` in whole milliseconds, at least 1."""
        seconds = self.ttl_seconds
        assert isinstance(seconds, int | float)
        return max(1, int(seconds * 1000))
