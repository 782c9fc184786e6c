"""qflow: an asyncio-native job queue over Redis.

Producers ``await queue.add(...)``; worker processes run ``@queue.processor`` handlers. ``concurrency`` is how
many jobs one process runs at once; processes are how many of those run side by side.
"""

from ._admin import JobInfo as JobInfo
from ._admin import RetryReport as RetryReport
from ._app import App as App
from ._dedup import AddOutcome as AddOutcome
from ._dedup import Dedup as Dedup
from ._job import Job as Job
from ._options import JobOptions as JobOptions
from ._processor import Processor as Processor
from ._queue import JobSpec as JobSpec
from ._queue import Queue as Queue
from ._schedule import Schedule as Schedule
from ._settings import RetentionSettings as RetentionSettings
from ._settings import WorkerSettings as WorkerSettings
from ._state import Backoff as Backoff
from ._state import State as State
from ._worker.worker import Worker as Worker
from .exceptions import BrokerAuthError as BrokerAuthError
from .exceptions import BrokerError as BrokerError
from .exceptions import BrokerFull as BrokerFull
from .exceptions import BrokerUnavailable as BrokerUnavailable
from .exceptions import ClientPoolExhausted as ClientPoolExhausted
from .exceptions import ConfigurationError as ConfigurationError
from .exceptions import CorruptQueue as CorruptQueue
from .exceptions import JobError as JobError
from .exceptions import JobExpired as JobExpired
from .exceptions import JobFailed as JobFailed
from .exceptions import JobNotFound as JobNotFound
from .exceptions import PayloadError as PayloadError
from .exceptions import PayloadTooLarge as PayloadTooLarge
from .exceptions import QflowError as QflowError
from .exceptions import ResultTimeout as ResultTimeout
from .exceptions import Retry as Retry
from .exceptions import SchemaMismatch as SchemaMismatch
from .exceptions import UnknownJobName as UnknownJobName

__all__ = (
    "AddOutcome",
    "App",
    "Backoff",
    "BrokerAuthError",
    "BrokerError",
    "BrokerFull",
    "BrokerUnavailable",
    "ClientPoolExhausted",
    "ConfigurationError",
    "CorruptQueue",
    "Dedup",
    "Job",
    "JobError",
    "JobExpired",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobOptions",
    "JobSpec",
    "PayloadError",
    "PayloadTooLarge",
    "Processor",
    "QflowError",
    "Queue",
    "ResultTimeout",
    "RetentionSettings",
    "Retry",
    "RetryReport",
    "Schedule",
    "SchemaMismatch",
    "State",
    "UnknownJobName",
    "Worker",
    "WorkerSettings",
)

__version__ = "0.1.0.dev0"
