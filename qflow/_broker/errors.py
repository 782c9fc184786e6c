"""The one place that maps redis-py's errors to qflow's.

- a connection that failed, dropped or stayed silent past the socket timeout (``redis.exceptions.
  ConnectionError``, ``TimeoutError``) -> ``BrokerUnavailable``;
- an out-of-memory reply (``OutOfMemoryError``, the class redis-py gives the server's ``-OOM`` error, found
  by class and not by the text) -> ``BrokerFull``;
- the ``QFLOW_SCHEMA <stored>`` reply of a script that found another schema version -> ``SchemaMismatch``.

Any other error reply stays redis-py's own. Call sites wrap their Redis calls in ``translated("what")``; the
few that log an unexpected error reply and carry on (an idle fetcher's wait) name it ``ErrorReply``.
"""

from __future__ import annotations

from types import TracebackType

from redis import exceptions as rexc

from ..exceptions import BrokerFull, BrokerUnavailable, SchemaMismatch

__all__ = ("UNAVAILABLE", "ErrorReply", "NoScript", "OutOfMemory", "is_timeout", "translate", "translated")

ErrorReply = rexc.ResponseError
"""An error reply from the server, of any kind ``translate`` leaves alone (e.g. an ACL refusing a command)."""

NoScript = rexc.NoScriptError
"""The reply to ``EVALSHA`` of a script the server does not hold: only ``scripts`` handles it."""

OutOfMemory = rexc.OutOfMemoryError
"""The server's ``-OOM`` reply: maxmemory reached under ``noeviction``."""

UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError)
"""redis-py's errors for a connection that failed, dropped, or stayed silent past the socket timeout."""


def translate(exc: Exception, what: str) -> Exception:
    """qflow's error for redis-py's ``exc`` raised by ``what`` (e.g. "script 'add'"), or ``exc`` itself."""
    if isinstance(exc, UNAVAILABLE):
        return BrokerUnavailable(f"Redis did not answer {what}: {exc}")
    if isinstance(exc, OutOfMemory):
        return BrokerFull(
            f"Redis refused {what}: maxmemory reached ({exc}); nothing was written. Let workers drain the "
            "queues, lower retention, or raise maxmemory; retrying later is safe"
        )
    if isinstance(exc, rexc.ResponseError) and "QFLOW_SCHEMA" in str(exc):
        return SchemaMismatch(
            f"this queue was written with qflow schema {str(exc).split()[-1]}; this qflow writes a "
            "different one: upgrade the older side, or migrate the queue"
        )
    return exc


class translated:  # lower case: it reads like a function, `with translated("INFO"):`
    """Context manager: redis-py errors raised inside come out as qflow's (see ``translate``), chained.

    A class rather than ``@contextmanager``: it wraps calls on the hot path, and costs nothing when no error
    is raised.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and isinstance(exc, rexc.RedisError):
            mapped = translate(exc, self.what)
            if mapped is not exc:
                raise mapped from exc


def is_timeout(exc: BrokerUnavailable) -> bool:
    """Whether the server stayed silent past the socket timeout (not: refused or dropped the connection)."""
    return isinstance(exc.__cause__, rexc.TimeoutError)
