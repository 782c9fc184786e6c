"""``JobOptions``: the options a processor sets as defaults and one job may override, in one Struct.

A processor's options are its defaults (``@queue.processor(attempts=3)``); a job's are overrides
(``queue.add(..., attempts=5)``) stored in its envelope. ``None`` means "not set here". The worker runs a
job with ``job_options.over(processor_options)``: the job's value where it set one, else the processor's,
else qflow's default. Everything is validated in ``JobOptions.__post_init__`` and nowhere else.
"""

from __future__ import annotations

from typing import Final

import msgspec

from ._settings import MAX_ATTEMPTS, MAX_SECONDS, check_number
from ._state import DEFAULT_BACKOFF, Backoff
from .exceptions import ConfigurationError

__all__ = ("DEFAULT_ATTEMPTS", "NO_OPTIONS", "JobOptions", "ResolvedOptions", "job_options")

DEFAULT_ATTEMPTS: Final = 1
"""Runs a job gets when neither its processor nor ``add`` set ``attempts``: one, no retry."""


class ResolvedOptions(msgspec.Struct, frozen=True):
    """The options one run of a job uses, every one settled (see ``JobOptions.over``)."""

    attempts: int
    """Total runs the job gets when its handler raises (1 = no retry)."""
    timeout: float | None
    """Seconds a run may take before it is cancelled; ``None``: no limit."""
    backoff: Backoff
    """Spacing of the retries."""


class JobOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How a job runs: ``attempts``, ``timeout``, ``backoff``. Unset fields (``None``) inherit.

    - ``attempts``: total runs a job gets when its handler raises, an ``int`` from 1 to 1,000,000 (qflow's
      default: 1).
    - ``timeout``: seconds one run may take before it is cancelled, a finite number ``> 0``, at most 100
      years (default: no limit). A sync (``def``) handler runs in a thread, which cannot be stopped: at
      its timeout the attempt is recorded as timed out (retried or failed) at once, but the thread runs on
      to its end and keeps its place among the processor's ``concurrency`` until then, so no more than
      ``concurrency`` threads of a processor ever run at once in a worker process.
    - ``backoff``: a ``qflow.Backoff``, the spacing of retries (default: exponential from 1 s, jitter 0.25).

    Give them to ``@queue.processor(...)`` as the processor's defaults, or to ``queue.add(...)``,
    ``processor.add(...)`` and ``JobSpec`` to override them for one job, either as keywords or as
    ``options=JobOptions(...)`` (keywords given beside ``options=`` win over its fields). A bad value raises
    ``ConfigurationError`` when the Struct is made.
    """

    attempts: int | None = None
    timeout: float | None = None
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        # The inline tests accept exactly the common valid values, cheaply (this runs for every add that
        # sets an option, and for every stored job that has one); anything else goes to check_number, which
        # raises with the message. nan fails every comparison, so it goes there too.
        attempts, timeout = self.attempts, self.timeout
        if attempts is not None and not (type(attempts) is int and 1 <= attempts <= MAX_ATTEMPTS):
            check_number("attempts", attempts, ge=1, le=MAX_ATTEMPTS, integer=True)
        if timeout is not None and not (type(timeout) in (float, int) and 0 < timeout <= MAX_SECONDS):
            check_number("timeout", timeout, gt=0, le=MAX_SECONDS, unit="seconds, or None for no limit")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise ConfigurationError(f"backoff must be a qflow.Backoff or None, got {self.backoff!r}")

    def over(self, defaults: JobOptions) -> ResolvedOptions:
        """These options laid over ``defaults`` (a processor's), then over qflow's own defaults."""
        attempts = self.attempts if self.attempts is not None else defaults.attempts
        timeout = self.timeout if self.timeout is not None else defaults.timeout
        backoff = self.backoff if self.backoff is not None else defaults.backoff
        return ResolvedOptions(
            attempts=DEFAULT_ATTEMPTS if attempts is None else attempts,
            timeout=timeout,
            backoff=DEFAULT_BACKOFF if backoff is None else backoff,
        )


NO_OPTIONS: Final = JobOptions()
"""Nothing set: a job that overrides nothing, a processor that keeps qflow's defaults."""


def job_options(
    options: JobOptions | None,
    *,
    attempts: int | None = None,
    timeout: float | None = None,
    backoff: Backoff | None = None,
) -> JobOptions:
    """One ``JobOptions`` from a call's ``options=`` and its keyword arguments (those given win)."""
    if options is None:
        options = NO_OPTIONS
    elif not isinstance(options, JobOptions):
        raise ConfigurationError(f"options must be a qflow.JobOptions or None, got {options!r}")
    if attempts is None and timeout is None and backoff is None:
        return options  # the common case: no Struct made, nothing checked again
    return JobOptions(
        attempts=options.attempts if attempts is None else attempts,
        timeout=options.timeout if timeout is None else timeout,
        backoff=options.backoff if backoff is None else backoff,
    )
