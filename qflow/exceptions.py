"""qflow's public errors, rooted at one class and grouped by what went wrong (httpx's layout).

```text
QflowError
├── ConfigurationError          a setting or argument qflow cannot work with (also a ValueError)
├── PayloadError                a payload qflow will not enqueue or could not decode (also a ValueError)
│   └── PayloadTooLarge         encoded payload over ``max_payload_bytes``
├── UnknownJobName              ``add`` names no processor registered on that queue (also a LookupError)
├── BrokerError                 Redis could not do what was asked
│   ├── BrokerUnavailable       unreachable, or silent past the socket timeout (also a ConnectionError)
│   │   └── ClientPoolExhausted every connection of this process's pool stayed busy (a client-side limit)
│   ├── BrokerAuthError         credentials, permissions (ACL) or TLS verification refused: not retried
│   ├── BrokerFull              refused a write: maxmemory reached (noeviction)
│   ├── CorruptQueue            a queue key holds data qflow cannot use; the script wrote nothing
│   └── SchemaMismatch          the queue's data was written by an incompatible qflow
└── JobError                    about one job: ``job_id`` says which
    ├── JobFailed               ``Job.result()`` on a job that ended in ``failed``
    │   └── JobExpired          ... or in ``expired``: not started before its ``expires=`` deadline
    ├── JobNotFound             no job with that id: never added, or trimmed (also a LookupError)
    └── ResultTimeout           ``Job.result(timeout=)`` ran out (also a TimeoutError)
```

Catch ``QflowError`` for anything qflow raises, a group (``BrokerError``, ``JobError``) for one kind of
trouble, or a leaf. The second bases keep ``except ValueError`` / ``ConnectionError`` / ``TimeoutError`` /
``LookupError`` working.

``Retry`` is not an error users catch: a processor raises it to ask for another attempt after a delay.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = (
    "BrokerAuthError",
    "BrokerError",
    "BrokerFull",
    "BrokerUnavailable",
    "ClientPoolExhausted",
    "ConfigurationError",
    "CorruptQueue",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobNotFound",
    "PayloadError",
    "PayloadTooLarge",
    "QflowError",
    "ResultTimeout",
    "Retry",
    "SchemaMismatch",
    "UnknownJobName",
)


class QflowError(Exception):
    """Root of every error qflow raises."""


class ConfigurationError(QflowError, ValueError):
    """A setting or argument has a value qflow cannot work with (settings, options, names, the Redis URL)."""


class PayloadError(QflowError, ValueError):
    """A payload could not be encoded, did not match the processor's type, or could not be decoded."""


class PayloadTooLarge(PayloadError):
    """The encoded payload is larger than the app's ``max_payload_bytes``."""


class UnknownJobName(QflowError, LookupError):
    """``add`` named a job no processor is registered for on that queue."""


class BrokerError(QflowError):
    """Redis (the broker) could not do what was asked: unreachable, full, or holding another data layout."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """Redis could not be reached, or did not answer within the socket timeout."""


class ClientPoolExhausted(BrokerUnavailable):
    """Every connection of one of this process's Redis pools stayed busy past the wait for a free one.

    A limit on this side, not a silent server: too many Redis calls at once in this process, or connections
    held for long (subscriptions, blocking commands on ``app.redis()``). The message names the pool, its size
    and the setting that raises it (``App(max_connections=...)``). Like ``BrokerUnavailable`` (its base, so
    retry loops keep working) it is transient: retrying once calls finish is safe.
    """


class BrokerAuthError(BrokerError):
    """Redis refused qflow's credentials or permissions, or its TLS certificate failed verification.

    A wrong user or password (``WRONGPASS``, ``NOAUTH``), an ACL user lacking a command or the queue's keys
    (``NOPERM``), or a certificate the client does not trust. Retrying cannot help: fix the Redis URL, the
    ACL user or the certificates. ``reason`` says which: ``"credentials"``, ``"permission"`` or ``"tls"``.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_auth, (self.args, self.reason))


class BrokerFull(BrokerError):
    """Redis refused a write because it reached ``maxmemory`` (policy ``noeviction``); nothing was written.

    Free memory (let workers drain the queues, lower retention) or raise ``maxmemory``; retry later.
    """


class CorruptQueue(BrokerError):
    """A key of the queue holds data qflow cannot use, so a script refused to run; it wrote nothing.

    A key of the wrong type (a string where the waiting list should be), or a token counter that is not a
    number, written by hand or by another program sharing the key prefix. The message names the key. No job
    left its list: repair or delete that key and the queue goes on. (A single job whose own stored counters
    are corrupt does not raise this: it fails alone, error kind ``"corrupt"``.)
    """


class SchemaMismatch(BrokerError):
    """The queue's keys were written by a qflow with an incompatible data layout."""


class JobError(QflowError):
    """An error about one job; ``job_id`` names it (``None`` only where no id was known)."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle (a process pool, a multiprocessing queue) rebuilds from the message and the attributes:
        # the default would call __init__ with the message only, losing job_id (and failing for JobFailed).
        return (_rebuild, (type(self), self.args, self.__dict__))


class JobNotFound(JobError, LookupError):
    """No job has that id: it was never added, or it was trimmed by result retention."""


class JobFailed(JobError):
    """The job ended in the ``failed`` state; ``kind``, ``error_type``, ``message``, ``traceback`` say why."""

    def __init__(
        self, job_id: str, error_type: str, message: str, traceback: str, *, kind: str = "error"
    ) -> None:
        super().__init__(f"job {job_id} failed: {error_type}: {message}", job_id=job_id)
        self.job_id: str = job_id
        self.kind = kind
        """Why, in one word: error, timeout, stalled, payload, unknown_name or result."""
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class JobExpired(JobFailed):
    """The job ended in the ``expired`` state: it was not started before its ``expires=`` deadline, and never
    ran. A ``JobFailed`` (``kind`` ``"expired"``), so code that catches failures catches it too."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            job_id, "JobExpired", "not started before its expires= deadline; it never ran", "", kind="expired"
        )


class ResultTimeout(JobError, TimeoutError):
    """``Job.result(timeout=...)`` returned before the job finished (the job itself goes on)."""


_MAX_RETRY_DELAY = 3_153_600_000
# = qflow._settings.MAX_SECONDS (100 years), written out: importing _settings here would be an import cycle.
# tests/unit/test_number_validation.py checks the two agree.


class Retry(Exception):
    """Raise from a processor to schedule another attempt after ``delay`` seconds.

    It spends an attempt like any error; when no attempts are left the job fails with this exception.
    A ``delay`` that is negative, over 100 years or not a finite number raises ``ConfigurationError``.
    """

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        if (
            not isinstance(delay, int | float)
            or isinstance(delay, bool)
            or not math.isfinite(delay)
            or delay < 0
            or delay > _MAX_RETRY_DELAY
        ):
            raise ConfigurationError(
                f"Retry delay must be a finite number >= 0 and <= {_MAX_RETRY_DELAY:,} (seconds, 100 years), "
                f"got {delay!r}"
            )
        super().__init__(reason or f"retry requested (delay {delay}s)")
        self.delay = float(delay)


def _rebuild_auth(args: tuple[Any, ...], reason: str) -> BrokerAuthError:
    return BrokerAuthError(*args, reason=reason)


def _rebuild(cls: type[JobError], args: tuple[Any, ...], state: dict[str, Any]) -> JobError:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc
