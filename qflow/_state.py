"""The job lifecycle as data: states, the transitions between them, and the retry decision.

Pure: no Redis, no asyncio. The Lua scripts in ``lua/`` carry out these transitions atomically; the worker
asks ``decide_after_error`` what to do when a handler raises. ``TRANSITIONS`` is the table the docs draw.
"""

from __future__ import annotations

import enum
import random
from typing import Final, Literal

import msgspec

__all__ = ("DEFAULT_BACKOFF", "TERMINAL", "TRANSITIONS", "Backoff", "Decision", "State", "decide_after_error")


class State(enum.StrEnum):
    """Where a job is in its life. ``completed``, ``failed`` and ``expired`` are terminal."""

    DELAYED = "delayed"
    WAITING = "waiting"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.EXPIRED})

TRANSITIONS: tuple[tuple[State | None, State, str, str], ...] = (
    (None, State.WAITING, "add", "added with no delay"),
    (None, State.DELAYED, "add", "added with delay= or run_at= in the future"),
    (None, State.WAITING, "dedup", "added with dedup= (its key free, or debounce and its job started)"),
    (None, State.DELAYED, "dedup", "the same, with delay= or run_at= in the future"),
    (
        State.WAITING,
        State.DELAYED,
        "dedup",
        "debounced: an add with its dedup key and a delay replaced its payload and pushed its due time",
    ),
    (
        State.DELAYED,
        State.WAITING,
        "dedup",
        "debounced: an add with its dedup key and no delay replaced its payload; due now",
    ),
    (State.DELAYED, State.WAITING, "claim", "its time came (server clock)"),
    (
        State.DELAYED,
        State.EXPIRED,
        "claim",
        "its time came after its expires= deadline: discarded, never run",
    ),
    (
        State.WAITING,
        State.ACTIVE,
        "claim",
        "a worker took it under a lease with a new fencing token",
    ),
    (
        State.WAITING,
        State.FAILED,
        "claim",
        "its stored envelope is over the worker's limit (max_payload_bytes + 64 KiB; it was written around "
        "add()): error kind 'payload', no lease, no attempt spent",
    ),
    (
        State.WAITING,
        State.FAILED,
        "claim",
        "its stored attempts or stalls counter is not a number: error kind 'corrupt' naming the field; the "
        "rest of the batch is claimed",
    ),
    (
        State.WAITING,
        State.EXPIRED,
        "claim",
        "added with expires= and not claimed by then: discarded, never run; no attempt spent",
    ),
    (State.ACTIVE, State.COMPLETED, "complete", "the handler returned; token current"),
    (
        State.ACTIVE,
        State.WAITING,
        "retry",
        "the handler raised; attempts left; a zero delay (Retry(delay=0) or a fixed 0 backoff)",
    ),
    (State.ACTIVE, State.DELAYED, "retry", "the handler raised; attempts left; backoff delay"),
    (
        State.ACTIVE,
        State.FAILED,
        "fail",
        "the handler raised with no attempts left, or a payload/name error",
    ),
    (
        State.ACTIVE,
        State.WAITING,
        "release",
        "graceful stop: not started (claimed ahead), or drain timeout passed; no attempt spent",
    ),
    (State.ACTIVE, State.WAITING, "recover", "lease expired (worker died); stalls <= max_stalls"),
    (
        State.ACTIVE,
        State.FAILED,
        "recover",
        "lease expired more than max_stalls times: reason 'stalled' (or its stalls counter is not a number: "
        "kind 'corrupt')",
    ),
    (
        State.FAILED,
        State.WAITING,
        "retry_failed",
        "an operator's retry (qflow jobs retry): attempts, stalls and last error cleared; back of the line",
    ),
)
"""Every state change the Lua scripts make, as rows ``(from, to, script, when)``: ``from`` is None for a job
being created, ``script`` names ``lua/<script>.lua``. One script call may chain rows of its own (claim takes
a job that just became due: delayed -> waiting -> active). The docs draw this table, and the Hypothesis state
machine (tests/integration/test_lifecycle_stateful.py) fails on any change of a job's stored state that no
row explains. Removing a job is not a transition: retention trims finished jobs (the diagram's ``[*]``), and
claim drops a waiting id whose envelope was deleted by hand."""


class Backoff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How long to wait before retrying a failed attempt.

    ``kind="fixed"`` waits ``delay`` every time; ``"exponential"`` waits ``delay * 2**(attempt-1)``; both are
    capped at ``max_delay``. ``jitter`` (0..1) randomises each wait down by up to that fraction, so jobs that
    failed together do not all retry in the same instant.
    """

    kind: Literal["fixed", "exponential"] = "exponential"
    delay: float = 1.0
    max_delay: float = 3600.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        # Imported here: _state stays free of module-level qflow imports (pure data); the check is shared.
        from ._settings import MAX_SECONDS, check_number
        from .exceptions import ConfigurationError

        if self.kind not in ("fixed", "exponential"):
            raise ConfigurationError(f"Backoff kind must be 'fixed' or 'exponential', got {self.kind!r}")
        check_number("Backoff delay", self.delay, ge=0, le=MAX_SECONDS, unit="seconds")
        check_number("Backoff max_delay", self.max_delay, ge=0, le=MAX_SECONDS, unit="seconds")
        check_number("Backoff jitter", self.jitter, ge=0, le=1)

    def seconds(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before the retry that follows failed attempt number ``attempt`` (1-based)."""
        base = self.delay if self.kind == "fixed" else self.delay * 2.0 ** min(max(attempt - 1, 0), 62)
        base = min(base, self.max_delay)
        if self.jitter:
            base *= 1.0 - self.jitter * (rng or random).random()
        return base


DEFAULT_BACKOFF: Final = Backoff(kind="exponential", delay=1.0, max_delay=3600.0, jitter=0.25)
"""The retry spacing of a job whose processor and ``add`` set no ``backoff``: about 1 s, 2 s, 4 s… up to an
hour, each wait shortened at random by up to a quarter so that jobs which failed together (a dependency
went down) do not all retry in the same instant. ``Backoff(kind="fixed", delay=0)`` retries at once."""


class Decision(msgspec.Struct, frozen=True):
    """What to do after a failed attempt: retry after ``delay`` seconds, or fail for good."""

    retry: bool
    delay: float = 0.0


def decide_after_error(
    *,
    attempts_spent: int,
    max_attempts: int,
    backoff: Backoff | None,
    requested_delay: float | None,
    rng: random.Random | None = None,
) -> Decision:
    """Decide the fate of a job whose handler just raised.

    ``attempts_spent`` counts earlier failed attempts, not this one. ``requested_delay`` is set when the
    handler raised ``qflow.Retry(delay=...)``; it wins over the backoff policy. ``backoff=None`` means
    ``DEFAULT_BACKOFF``. Crash recoveries (stalls) are
    counted apart and never reach here.
    """
    this_attempt = attempts_spent + 1
    if this_attempt >= max_attempts:
        return Decision(retry=False)
    if requested_delay is not None:
        from ._settings import MAX_SECONDS

        # Retry() checks its delay; one changed after it was made (``exc.delay = 1e308``) must still not
        # reach the retry script as inf or nan milliseconds: it is kept within [0, MAX_SECONDS] (nan: 0).
        if not 0 <= requested_delay <= MAX_SECONDS:
            requested_delay = float(MAX_SECONDS) if requested_delay > MAX_SECONDS else 0.0
        return Decision(retry=True, delay=requested_delay)
    return Decision(retry=True, delay=(backoff or DEFAULT_BACKOFF).seconds(this_attempt, rng))
