"""The one place that maps redis-py's errors to qflow's.

- credentials refused (``AuthenticationError``: ``WRONGPASS``, ``NOAUTH``, AUTH to a server without a
  password), a command or key an ACL denies (``NoPermissionError``, ``NOPERM``, "ACL failure in script"), a
  TLS certificate that failed verification (``ssl.SSLCertVerificationError`` behind a ``ConnectionError``)
  -> ``BrokerAuthError``, never retried: checked before the classes below, which some of these subclass;
- every connection of one of this process's pools busy (``MaxConnectionsError``, or the "Too many
  connections" / "No connection available." of redis-py's pools) -> ``ClientPoolExhausted``;
- a connection that failed, dropped or stayed silent past the socket timeout (``redis.exceptions.
  ConnectionError``, ``TimeoutError``) -> ``BrokerUnavailable``;
- an out-of-memory reply (``OutOfMemoryError``, the class redis-py gives the server's ``-OOM`` error, found
  by class and not by the text) -> ``BrokerFull``;
- the ``QFLOW_SCHEMA <stored>`` reply of a script that found another schema version -> ``SchemaMismatch``;
- the ``QFLOW_CORRUPT <what>`` reply of a script that found a key of the wrong type or a corrupt counter
  before writing anything -> ``CorruptQueue``.

Any other error reply stays redis-py's own. Call sites wrap their Redis calls in ``translated("what")``; the
few that log an unexpected error reply and carry on (an idle fetcher's wait) name it ``ErrorReply``.
"""

from __future__ import annotations

import ssl
from types import TracebackType

from redis import exceptions as rexc

from ..exceptions import (
    BrokerAuthError,
    BrokerFull,
    BrokerUnavailable,
    ClientPoolExhausted,
    CorruptQueue,
    SchemaMismatch,
)

__all__ = (
    "UNAVAILABLE",
    "ErrorReply",
    "NoScript",
    "OutOfMemory",
    "auth_failure",
    "is_timeout",
    "translate",
    "translated",
)

ErrorReply = rexc.ResponseError
"""An error reply from the server, of any kind ``translate`` leaves alone (e.g. an ACL refusing a command)."""

NoScript = rexc.NoScriptError
"""The reply to ``EVALSHA`` of a script the server does not hold: only ``scripts`` handles it."""

OutOfMemory = rexc.OutOfMemoryError
"""The server's ``-OOM`` reply: maxmemory reached under ``noeviction``."""

UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError)
"""redis-py's errors for a connection that failed, dropped, or stayed silent past the socket timeout."""


_POOL_FULL = ("Too many connections", "No connection available.")  # redis-py 5.3 to 8, both pool kinds
_REFUSED_REPLIES = ("NOPERM", "WRONGPASS", "NOAUTH")  # an error reply starting so, whatever class it got
_HINTS = {
    "credentials": "check the user name and password in the Redis URL (redis://USER:PASSWORD@HOST:PORT/DB)",
    "permission": "the URL's Redis user (ACL) needs qflow's commands on its keys, e.g. ACL SETUSER <user> "
    "on >PASSWORD '~<prefix>:*' +@all -@dangerous +info +client|id +client|unblock",
    "tls": "trust the server's certificate authority (rediss://HOST:PORT/DB?ssl_ca_certs=/path/to/ca.pem) "
    "or fix the server's certificate",
}


def auth_failure(exc: BaseException) -> str | None:
    """``"credentials"``, ``"permission"`` or ``"tls"`` if ``exc`` is Redis refusing who we are or what we
    may do, or a TLS certificate that failed verification; None for anything else."""
    if isinstance(exc, rexc.AuthorizationError | rexc.NoPermissionError):
        return "permission"
    if isinstance(exc, rexc.AuthenticationError):
        return "credentials"
    if isinstance(exc, rexc.ResponseError):
        text = str(exc)
        if text.startswith(_REFUSED_REPLIES):
            return "permission" if text.startswith("NOPERM") else "credentials"
        # An ACL refusing a command or an undeclared key inside a script: "ACL failure in script: ..."
        return "permission" if "ACL failure in script" in text else None
    if isinstance(exc, rexc.ConnectionError):
        seen: BaseException | None = exc
        for _ in range(5):  # redis-py raises ConnectionError inside `except OSError`: the cause is a context
            if seen is None:
                break
            if isinstance(seen, ssl.SSLCertVerificationError):
                return "tls"
            seen = seen.__cause__ or seen.__context__
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return "tls"
    return None


def translate(exc: Exception, what: str) -> Exception:
    """qflow's error for redis-py's ``exc`` raised by ``what`` (e.g. "script 'add'"), or ``exc`` itself."""
    reason = auth_failure(exc)
    if reason is not None:
        refused = {
            "credentials": f"Redis refused the credentials ({what})",
            "permission": f"Redis refused {what} (ACL permission)",
            "tls": f"TLS certificate verification failed ({what})",
        }[reason]
        return BrokerAuthError(f"{refused}: {exc} -- {_HINTS[reason]}; retrying does not help", reason=reason)
    if isinstance(exc, rexc.MaxConnectionsError) or (
        isinstance(exc, rexc.ConnectionError) and str(exc) in _POOL_FULL
    ):
        return ClientPoolExhausted(f"no free Redis connection for {what}: {exc}")
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
    if isinstance(exc, rexc.ResponseError) and str(exc).startswith("QFLOW_CORRUPT "):
        return CorruptQueue(
            f"{what} refused to run: {str(exc).removeprefix('QFLOW_CORRUPT ')}; nothing was written. "
            "Repair or delete that key (another program may share the key prefix)"
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
