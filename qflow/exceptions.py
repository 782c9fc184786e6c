"""qflow's public errors, rooted at one class.

```text
QflowError
├── ConfigurationError          bad settings (no Redis URL, invalid queue name, bad option value)
├── PayloadError                a payload qflow will not enqueue or could not decode
│   └── PayloadTooLarge         encoded payload over ``max_payload_bytes``
├── UnknownJobName              ``add`` names no processor registered on that queue
├── BrokerUnavailable           Redis unreachable or silent past the socket timeout
├── BrokerFull                  Redis refused a write: maxmemory reached (noeviction)
├── SchemaMismatch              the queue's data was written by an incompatible qflow
├── JobNotFound                 no job with that id (never added, or trimmed by retention)
├── JobFailed                   ``Job.result()`` on a job that ended in ``failed``
└── ResultTimeout               ``Job.result(timeout=)`` ran out (also a ``TimeoutError``)
```

``Retry`` is not an error users catch: a processor raises it to ask for another attempt after a delay.
"""

from __future__ import annotations

__all__ = (
    "BrokerFull",
    "BrokerUnavailable",
    "ConfigurationError",
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
    """A setting or argument has a value qflow cannot work with."""


class PayloadError(QflowError, ValueError):
    """A payload could not be encoded, did not match the processor's type, or could not be decoded."""


class PayloadTooLarge(PayloadError):
    """The encoded payload is larger than the app's ``max_payload_bytes``."""


class UnknownJobName(QflowError, LookupError):
    """``add`` named a job no processor is registered for on that queue."""


class BrokerUnavailable(QflowError, ConnectionError):
    """Redis could not be reached, or did not answer within the socket timeout."""


class BrokerFull(QflowError):
    """Redis refused a write because it reached ``maxmemory`` (policy ``noeviction``); nothing was written.

    Free memory (let workers drain the queues, lower retention) or raise ``maxmemory``; retry later.
    """


class SchemaMismatch(QflowError):
    """The queue's keys were written by a qflow with an incompatible data layout."""


class JobNotFound(QflowError, LookupError):
    """No job has that id: it was never added, or it was trimmed by result retention."""


class JobFailed(QflowError):
    """The job ended in the ``failed`` state; ``kind``, ``error_type``, ``message``, ``traceback`` say why."""

    def __init__(
        self, job_id: str, error_type: str, message: str, traceback: str, *, kind: str = "error"
    ) -> None:
        super().__init__(f"job {job_id} failed: {error_type}: {message}")
        self.job_id = job_id
        self.kind = kind
        """Why, in one word: error, timeout, stalled, payload, unknown_name or result."""
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class ResultTimeout(QflowError, TimeoutError):
    """``Job.result(timeout=...)`` returned before the job finished."""


class Retry(Exception):
    """Raise from a processor to schedule another attempt after ``delay`` seconds.

    It spends an attempt like any error; when no attempts are left the job fails with this exception.
    """

    def __init__(self, delay: float = 0.0, reason: str = "") -> None:
        if delay < 0:
            raise ValueError(f"Retry delay must be >= 0 seconds, got {delay!r}")
        super().__init__(reason or f"retry requested (delay {delay}s)")
        self.delay = float(delay)
