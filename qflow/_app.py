"""``App``: settings, the Redis connection, and the registry of queues and processors.

Constructing an ``App``, declaring queues and decorating processors only records metadata: no I/O, no event
loop, no thread. The connection opens on first use, inside a running event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from ._broker.keys import check_queue_name
from ._settings import RetentionSettings, WorkerSettings
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = ("App", "configured_url", "resolve_url")

_URL_VARS = ("QFLOW_REDIS_URL", "REDIS_URL")


class App:
    """A qflow application: where the queues live and which processors they have.

    ``url`` is a Redis URL; without one, ``QFLOW_REDIS_URL`` then ``REDIS_URL`` are read when the first
    connection opens, and with none of them the project's embedded server is used (``resolve_url()``).
    Producers (an API process) and workers import the same ``App``; only the entry point differs.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "qflow",
        max_payload_bytes: int = 1024 * 1024,
        socket_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        worker: WorkerSettings | None = None,
        retention: RetentionSettings | None = None,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"invalid key prefix {prefix!r}: non-empty, without braces")
        if max_payload_bytes < 1:
            raise ConfigurationError(f"max_payload_bytes must be >= 1, got {max_payload_bytes!r}")
        if socket_timeout <= 0 or connect_timeout <= 0:
            raise ConfigurationError("socket_timeout and connect_timeout must be > 0 seconds")
        self._url = url
        self.prefix = prefix
        self.max_payload_bytes = max_payload_bytes
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.worker_settings = worker or WorkerSettings()
        self.retention = retention or RetentionSettings()
        self._queues: dict[str, Queue] = {}
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}

    def __repr__(self) -> str:
        return f"<qflow.App prefix={self.prefix!r} queues={sorted(self._queues)}>"

    @property
    def url(self) -> str:
        """The configured Redis URL: ``App(url=...)``, else ``QFLOW_REDIS_URL``, else ``REDIS_URL``.

        Reading it has no side effect. With none of them set, it raises ``ConfigurationError``: the URL is
        then the embedded server's, which only ``resolve_url()`` finds (starting the server if it must).
        """
        url = configured_url(self._url)
        if url is None:
            raise ConfigurationError(
                "no Redis URL configured: pass App(url=...) or set QFLOW_REDIS_URL (or REDIS_URL); without "
                "one, app.resolve_url() starts the project's embedded server and returns its URL"
            )
        return url

    def resolve_url(self, *, announce: bool = True) -> str:
        """The Redis URL in use: the argument, else ``QFLOW_REDIS_URL``, else ``REDIS_URL``.

        With none of them (and ``QFLOW_EMBEDDED`` not ``0``), the project's embedded Valkey server, started
        on first need, detached, reached over a unix socket. Its directory is ``QFLOW_HOME``, else ``.qflow``
        in the nearest directory at or above the current one holding a ``pyproject.toml``, ``setup.py``,
        ``setup.cfg`` or ``.git`` (so every subdirectory of a project reaches the same server), else
        ``./.qflow``. The first call in a process says on stderr which server and why; ``announce=False``
        leaves that line out in a process whose command already printed it (starting the server is still
        said).
        """
        return resolve_url(self._url, announce=announce)

    def queue(self, name: str, *, retention: RetentionSettings | None = None) -> Queue:
        """The queue called ``name`` (declared on first call; later calls return the same object)."""
        from ._queue import Queue

        try:
            check_queue_name(name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        existing = self._queues.get(name)
        if existing is not None:
            if retention is not None and retention != existing.retention:
                raise ConfigurationError(f"queue {name!r} was already declared with other retention")
            return existing
        q = Queue(self, name, retention=retention or self.retention)
        self._queues[name] = q
        return q

    @property
    def queues(self) -> dict[str, Queue]:
        """Declared queues by name (a copy)."""
        return dict(self._queues)

    def redis(self) -> aioredis.Redis:
        """The connection pool for the running event loop (created on first use; no I/O until a command).

        Socket timeouts are always set, so a dead TCP path or a silent server surfaces in seconds
        (redis-py's defaults can wait forever).
        """
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old_loop in [lp for lp in self._clients if lp.is_closed()]:
                del self._clients[old_loop]
            url = self.resolve_url()
            tcp_only = {} if url.startswith("unix:") else {"socket_keepalive": True}
            client = aioredis.Redis.from_url(
                url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.connect_timeout,
                health_check_interval=30,
                **tcp_only,
                # No retries inside redis-py: they nest (pool, connection, command) and multiply the socket
                # timeout ~9x for a silent server. qflow retries where it is safe and bounded instead.
                retry=RedisRetry(NoBackoff(), retries=0),
                decode_responses=False,
            )
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        """Close this event loop's connection pool."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run_worker(
        self,
        queues: Iterable[str | Queue] | None = None,
        *,
        concurrency: int | None = None,
        burst: bool = False,
        settings: WorkerSettings | None = None,
        handle_signals: bool = False,
    ) -> None:
        """Run a worker in this process until stopped (or, with ``burst=True``, until the queues are drained).

        ``queues`` defaults to every queue with processors. ``concurrency`` overrides each processor's own.
        With ``handle_signals=True`` the first SIGTERM/SIGINT drains gracefully and a second stops at once.
        """
        from ._worker.worker import Worker

        worker = Worker(
            self,
            queues,
            concurrency=concurrency,
            burst=burst,
            settings=settings or self.worker_settings,
        )
        await worker.run(handle_signals=handle_signals)


def resolve_url(url: str | None = None, *, announce: bool = True) -> str:
    """The Redis URL for ``url`` (``App(url=...)``): it, else the variables, else the embedded server.

    See ``App.resolve_url``; this form serves callers that have a URL or nothing, but no ``App``.
    """
    configured = configured_url(url)
    if configured is not None:
        return configured
    from . import _embedded

    if _embedded.embedded_disabled():
        raise ConfigurationError(
            "no Redis URL: pass App(url=...) or set QFLOW_REDIS_URL (or REDIS_URL), e.g. "
            "QFLOW_REDIS_URL=redis://127.0.0.1:6379/0 (QFLOW_EMBEDDED=0 turned the embedded server off)"
        )
    server = _embedded.server_for()
    started = _embedded.ensure_running(server)
    _embedded.announce(server, started, quiet=not announce)
    return server.url


def configured_url(url: str | None = None) -> str | None:
    """``url`` if given, else ``QFLOW_REDIS_URL``, else ``REDIS_URL``, else None (no I/O, no server)."""
    if url:
        return url
    for var in _URL_VARS:
        value = os.environ.get(var)
        if value:
            return value
    return None
