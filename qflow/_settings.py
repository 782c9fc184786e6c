"""Option groups, as frozen msgspec Structs (validated on construction)."""

from __future__ import annotations

import msgspec

__all__ = ("RetentionSettings", "WorkerSettings")


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
        if self.lease_ttl < 0.3:
            raise ValueError(f"lease_ttl must be >= 0.3 s, got {self.lease_ttl!r}")
        if self.check_interval < 0.05:
            raise ValueError(f"check_interval must be >= 0.05 s, got {self.check_interval!r}")
        if self.max_stalls < 0:
            raise ValueError(f"max_stalls must be >= 0, got {self.max_stalls!r}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0 s, got {self.drain_timeout!r}")
        if not 0.01 <= self.block_timeout <= 60:
            raise ValueError(f"block_timeout must be within 0.01..60 s, got {self.block_timeout!r}")
        if self.claim_batch < 1:
            raise ValueError(f"claim_batch must be >= 1, got {self.claim_batch!r}")
        if not 0 <= self.prefetch_window <= 60:
            raise ValueError(f"prefetch_window must be within 0..60 s, got {self.prefetch_window!r}")


class RetentionSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How many finished jobs a queue keeps, and for how long (seconds; ``None`` = no age limit).

    Trimming happens inside the finishing scripts, a bounded number of jobs per call, so Redis memory stays
    bounded without a separate sweeper.
    """

    completed_count: int = 1000
    completed_age: float | None = 24 * 3600.0
    failed_count: int = 10_000
    failed_age: float | None = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.completed_count < 0 or self.failed_count < 0:
            raise ValueError("retention counts must be >= 0")
        for age in (self.completed_age, self.failed_age):
            if age is not None and age < 0:
                raise ValueError("retention ages must be >= 0 seconds or None")
