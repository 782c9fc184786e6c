"""Plain Redis commands qflow sends outside its scripts: the server clock, blocking waits, ending a wait."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import translated

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .keys import QueueKeys

__all__ = (
    "COUNTED_STATES",
    "blmove",
    "bzpopmin",
    "command",
    "count_states",
    "server_ms",
    "unblock",
    "wait_for_push",
    "wait_for_wakeup",
)

COUNTED_STATES = ("waiting", "active", "delayed", "completed", "failed", "expired")
"""The states ``count_states`` counts, in the order it queues their commands."""


async def command(client: aioredis.Redis, *args: Any) -> Any:
    """Send one raw command (redis-py's ``execute_command`` is untyped; this is the one typed doorway).

    Errors come out as redis-py raises them: callers wrap it in ``translated``.
    """
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def blmove(key: str | bytes, timeout: float) -> tuple[Any, ...]:
    """``BLMOVE key key RIGHT RIGHT timeout``: wait until the list has an element (rotating it takes none).

    At least 1 ms: a timeout that rounds to ``0.000`` would make the server block forever, and the socket
    timeout would then end the wait as a dead server.
    """
    return ("BLMOVE", key, key, "RIGHT", "RIGHT", f"{max(timeout, 0.001):.3f}")


def bzpopmin(key: str | bytes, timeout: float) -> tuple[Any, ...]:
    """``BZPOPMIN key timeout``: wait until the sorted set has a member, and take the lowest (one waiter per
    member: a wake-up wakes one idle fetcher). At least 1 ms, as for ``blmove``."""
    return ("BZPOPMIN", key, f"{max(timeout, 0.001):.3f}")


def count_states(pipe: Any, keys: QueueKeys) -> None:
    """Queue on ``pipe`` one count per state of ``COUNTED_STATES`` (LLEN or ZCARD), in that order."""
    pipe.llen(keys.wait)
    pipe.zcard(keys.active)
    pipe.zcard(keys.delayed)
    pipe.zcard(keys.completed)
    pipe.zcard(keys.failed)
    pipe.zcard(keys.expired)


async def wait_for_push(client: aioredis.Redis, key: str | bytes, timeout: float) -> None:
    """Block on the server until ``key`` (a list) holds an element, or ``timeout`` seconds pass.

    ``timeout`` must be shorter than the socket timeout, which would otherwise end the wait as a failure.
    Raises ``BrokerUnavailable``, or ``BrokerFull`` at maxmemory (BLMOVE is a deny-oom write).
    """
    with translated("a blocking wait"):
        await command(client, *blmove(key, timeout))


async def wait_for_wakeup(client: aioredis.Redis, marker: str | bytes, timeout: float) -> None:
    """Block on the server until a wake-up on ``marker`` (taken: see ``bzpopmin``), or ``timeout`` seconds.

    ``timeout`` must be shorter than the socket timeout. Raises ``BrokerUnavailable``; a ``marker`` of the
    wrong type answers at once with an error reply.
    """
    with translated("a blocking wait"):
        await command(client, *bzpopmin(marker, timeout))


async def unblock(client: aioredis.Redis, client_id: int) -> None:
    """``CLIENT UNBLOCK``: end the blocking wait of connection ``client_id`` now, as if it timed out."""
    with translated("CLIENT UNBLOCK"):
        await command(client, "CLIENT", "UNBLOCK", client_id)


async def server_ms(client: aioredis.Redis) -> int:
    """Milliseconds on the Redis server's clock (``TIME``)."""
    with translated("TIME"):
        secs, micros = await command(client, "TIME")
    return int(secs) * 1000 + int(micros) // 1000
