"""``App``: settings, the Redis connections, and the registry of queues and processors.

Constructing an ``App``, declaring queues and decorating processors only records metadata: no I/O, no event
loop, no thread. Connections open on first use, inside a running event loop, in three pools per loop that
never lend each other a connection (DESIGN.md: the worker's own traffic never waits behind user traffic):

- ``redis()``: commands (adds, status, a result's read, admin, your own calls), at most ``max_connections``;
- blocking result waits (``Job.result``), at most ``max_result_waits`` at once, so waits cannot starve
  commands however many callers wait;
- the worker's own traffic (claims, acks, lease renewals, recovery, heartbeat), created only in a process
  that runs a worker, a few connections sized by its queues.

A pool whose connections all stay busy makes a call wait for one, then raise ``ClientPoolExhausted`` naming
the pool and its size (redis-py's own pool raises "Too many connections" at once, which a worker once took
for a dead server: issue 12 item 2).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff

from ._broker import commands
from ._broker.keys import check_queue_name
from ._settings import MAX_SECONDS, RetentionSettings, WorkerSettings, check_number
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from ._queue import Queue

__all__ = ("App", "ResultWaits", "configured_url", "resolve_url")

_URL_VARS = ("QFLOW_REDIS_URL", "REDIS_URL")
MAX_POOL = 10_000
"""The most connections one pool may have: a Redis server's default ``maxclients``."""


MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
"""The largest ``max_payload_bytes``: Redis' own limit on one string (``proto-max-bulk-len``, 512 MB)."""


class App:
    """A qflow application: where the queues live and which processors they have.

    ``url`` is a Redis URL; without one, ``QFLOW_REDIS_URL`` then ``REDIS_URL`` are read when the first
    connection opens, and with none of them the project's embedded server is used (``resolve_url()``).
    Producers (an API process) and workers import the same ``App``; only the entry point differs.

    Connections, per event loop: ``max_connections`` (default 100) for commands (``redis()``), and
    ``max_result_waits`` (default 50) for ``Job.result`` calls blocking on the server at once; a process that
    runs a worker also has the worker's own few (see the module docstring). Connections open as calls need
    them, so a quiet producer holds one or two.
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
        max_connections: int = 100,
        max_result_waits: int = 50,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"invalid key prefix {prefix!r}: non-empty, without braces")
        # nan <= 0 is false, and socket.settimeout(1e12) raises OverflowError: bound them where they enter.
        check_number("max_payload_bytes", max_payload_bytes, ge=1, le=MAX_PAYLOAD_BYTES, integer=True)
        check_number("socket_timeout", socket_timeout, gt=0, le=MAX_SECONDS, unit="seconds")
        check_number("connect_timeout", connect_timeout, gt=0, le=MAX_SECONDS, unit="seconds")
        check_number("max_connections", max_connections, ge=1, le=MAX_POOL, integer=True)
        check_number("max_result_waits", max_result_waits, ge=1, le=MAX_POOL, integer=True)
        self._url = url
        self.prefix = prefix
        self.max_payload_bytes = max_payload_bytes
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.worker_settings = worker or WorkerSettings()
        self.retention = retention or RetentionSettings()
        self.max_connections = max_connections
        self.max_result_waits = max_result_waits
        self._queues: dict[str, Queue] = {}
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
        self._waits: dict[asyncio.AbstractEventLoop, ResultWaits] = {}
        self._worker_clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}

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
        """The client for commands in the running event loop (created on first use; no I/O until a command).

        Adds, status and result reads, admin calls, and your own commands go through it: at most
        ``max_connections`` at once; a call finding all of them busy waits up to ``socket_timeout`` for one,
        then raises ``ClientPoolExhausted``. Blocking result waits and a worker's own traffic have pools of
        their own. Socket timeouts are always set, so a dead TCP path or a silent server surfaces in seconds
        (redis-py's defaults can wait forever).
        """
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            self._forget_closed_loops()
            client = self._client(
                f"all {{n}} connections of this process's Redis pool for commands (App(max_connections="
                f"{self.max_connections})) stayed busy for {{timeout:g}}s: too many Redis calls at once, or "
                "connections held long (subscriptions, blocking commands on app.redis()); raise "
                "App(max_connections=...) or make fewer calls at once",
                self.max_connections,
            )
            self._clients[loop] = client
        return client

    def _result_waits(self) -> ResultWaits:
        """The blocking result waits of the running event loop: a pool of ``max_result_waits`` connections
        that only ``Job.result`` blocks on, so waiting callers never hold the connections commands need."""
        loop = asyncio.get_running_loop()
        waits = self._waits.get(loop)
        if waits is None:
            self._forget_closed_loops()
            client = self._client(
                f"all {{n}} connections of this process's pool for result waits (App(max_result_waits="
                f"{self.max_result_waits})) stayed busy for {{timeout:g}}s",
                self.max_result_waits,
            )
            waits = self._waits[loop] = ResultWaits(client, self.max_result_waits)
        return waits

    def _worker_redis(self) -> aioredis.Redis:
        """The worker's own client in the running event loop: claims, acks, lease renewals, recovery, the
        fleet heartbeat and the scheduler, never handed to user code (a handler's adds and result waits use
        the other pools).

        Sized for the worker's long holders (one blocking fetch wait per queue, the scheduler's blocking
        read) plus the short calls, which wait their turn for a moment rather than fail: ``2 x queues + 9``
        connections.
        """
        loop = asyncio.get_running_loop()
        client = self._worker_clients.get(loop)
        if client is None:
            self._forget_closed_loops()
            size = 2 * sum(1 for q in self._queues.values() if q.processors) + 9
            client = self._client(
                "all {n} connections of the worker's own Redis pool (claims, acks, lease renewals, recovery: "
                "2 per queue + 9) stayed busy for {timeout:g}s: Redis answers too slowly",
                size,
            )
            self._worker_clients[loop] = client
        return client

    def _client(self, exhausted: str, size: int) -> aioredis.Redis:
        """A client on a pool of ``size`` connections to ``resolve_url()``; ``exhausted`` is the error text
        when none frees within the socket timeout (``{n}``: the size, ``{timeout}``: the wait)."""
        url = self.resolve_url()
        tcp_only = {} if url.startswith("unix:") else {"socket_keepalive": True}
        pool = _Pool.from_url(
            url,
            exhausted=exhausted,
            max_connections=size,
            timeout=self.socket_timeout,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=30,
            **tcp_only,
            # No retries inside redis-py: they nest (pool, connection, command) and multiply the socket
            # timeout ~9x for a silent server. qflow retries where it is safe and bounded instead.
            retry=RedisRetry(NoBackoff(), retries=0),
            decode_responses=False,
        )
        return aioredis.Redis.from_pool(pool)

    def _forget_closed_loops(self) -> None:
        for pools in (self._clients, self._waits, self._worker_clients):
            for old_loop in [lp for lp in pools if lp.is_closed()]:
                del pools[old_loop]

    async def close(self) -> None:
        """Close this event loop's connections (all three pools)."""
        loop = asyncio.get_running_loop()
        waits = self._waits.pop(loop, None)
        for client in (
            self._clients.pop(loop, None),
            None if waits is None else waits.client,
            self._worker_clients.pop(loop, None),
        ):
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


class _Pool(aioredis.ConnectionPool):
    """redis-py's pool, except that a call finding every connection busy waits for one to be released (up to
    ``timeout``) instead of failing at once, then fails naming the pool, its size and what to do
    (``MaxConnectionsError``, which ``_broker.errors`` turns into ``ClientPoolExhausted``).

    Not ``BlockingConnectionPool``: that one takes a condition and arms a timer for every command, measured
    at +10-20 us per call here (issue 12 item 2 notes); this one costs nothing until the pool is full.
    """

    def __init__(self, *, exhausted: str, timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exhausted = exhausted
        self.timeout = timeout
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except rexc.ConnectionError as exc:
            if not _pool_full(exc):
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:  # full: wait for a release, then try again (a newcomer may have been quicker)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                self._drop(waiter)
                text = self.exhausted.format(n=self.max_connections, timeout=self.timeout)
                raise rexc.MaxConnectionsError(text) from None
            except BaseException:  # cancelled from outside
                self._drop(waiter)
                raise
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except rexc.ConnectionError as exc:
                if not _pool_full(exc):
                    raise

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        if self._waiters:
            self._wake()

    def _drop(self, waiter: asyncio.Future[None]) -> None:
        """Forget a waiter that stops waiting; if it was woken meanwhile, pass its turn on."""
        if waiter.done() and not waiter.cancelled():
            self._wake()
        else:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        """Wake the longest waiting caller still waiting."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _pool_full(exc: Exception) -> bool:
    """redis-py's own "pool full" error: ``MaxConnectionsError`` in 8, a bare ``ConnectionError`` in 5.3."""
    return isinstance(exc, rexc.MaxConnectionsError) or str(exc) == "Too many connections"


class ResultWaits:
    """The blocking result waits of one event loop: a client, and as many slots as it has connections.

    A wait takes a slot, then blocks on the server on a connection no command needs. With every slot taken
    a caller queues for one, up to its own timeout, and returns empty-handed: ``Job.result`` then reads the
    job's state again (through ``App.redis()``) before it waits once more, so a process with more waiters
    than slots sees each outcome within one wait chunk (about 2 s), and no wait ever raises for want of a
    connection.
    """

    __slots__ = ("client", "slots")

    def __init__(self, client: aioredis.Redis, size: int) -> None:
        self.client = client
        self.slots = asyncio.Semaphore(size)

    async def wait_for_push(self, key: str, timeout: float) -> None:
        """Block until ``key`` (a list) holds an element or ``timeout`` seconds pass (less than the socket
        timeout); return early, having waited at most ``timeout``, when no slot freed in time."""
        slots = self.slots
        if slots.locked():
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                async with asyncio.timeout(timeout):
                    await slots.acquire()
            except TimeoutError:
                return
            timeout = deadline - loop.time()
            if timeout <= 0:
                slots.release()
                return
        else:
            await slots.acquire()  # free: no wait
        try:
            await commands.wait_for_push(self.client, key, timeout)
        finally:
            slots.release()
