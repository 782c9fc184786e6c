"""What a worker checks about the server at start: a version new enough, settings that keep promises, and
that its ACL user may do what a worker does.

qflow's guarantees hold while Redis keeps acknowledged writes (AOF on) and never evicts keys
(``maxmemory-policy noeviction``); see DESIGN.md. A server that breaks them still works, with a warning.
Wrong credentials, a denied command or key, or a TLS certificate that fails verification raise
``BrokerAuthError`` here, at start, rather than at the first claim: a worker that cannot work says so and
exits (``qflow worker``: exit code CONFIG, not restarted).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import BrokerAuthError, ConfigurationError
from .errors import translated

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ("check_access", "check_server")

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2)  # RPOP with a count and BLMOVE, both used on the hot path


async def check_server(client: aioredis.Redis) -> list[str]:
    """Raise if the server is too old; log and return a warning for each setting that weakens a guarantee.

    Credentials refused raise ``BrokerAuthError``. An ACL user denied ``INFO`` alone (``-@dangerous``) is
    warned about, not refused: the checks are skipped, the work does not need them.
    """
    try:
        with translated("INFO"):
            info: dict[str, Any] = await client.info()
    except BrokerAuthError as exc:
        if exc.reason != "permission":
            raise
        text = (
            f"the Redis user may not run INFO ({exc.__cause__}): the server's version, AOF and eviction "
            "policy were not checked; allow it with +info to have them checked at start"
        )
        log.warning("%s", text)
        return [text]
    version = str(info.get("redis_version", "0.0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_VERSION:
        raise ConfigurationError(
            f"Redis {version} is too old: qflow needs Redis >= 6.2 or Valkey >= 7.2 (RPOP count, BLMOVE)"
        )
    warnings = []
    if str(info.get("aof_enabled", "0")) != "1":
        warnings.append(
            "the Redis server has AOF off (appendonly no): a server restart loses every job written since "
            "the last snapshot; set 'appendonly yes' for qflow's durability guarantee"
        )
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        warnings.append(
            f"the Redis server's maxmemory-policy is {policy!r}: under memory pressure it may evict queue "
            "keys, losing jobs silently; set 'maxmemory-policy noeviction'"
        )
    for text in warnings:
        log.warning("%s", text)
    return warnings


async def check_access(client: aioredis.Redis, key_groups: Mapping[str, Sequence[str]]) -> None:
    """Raise ``BrokerAuthError`` unless the client's ACL user may run scripts over every key of each group.

    ``key_groups``: a name for each group (``"queue 'email'"``) and its keys. One ``EVAL`` of an empty
    script per group, pipelined: before running a script the server checks its declared keys for read and
    write access, so a user whose key patterns miss a queue's keys (or who may not run scripts) is refused
    here, at start, instead of by the first claim. Each group must share one hash tag (a queue's keys do),
    so each call stays in one Cluster slot.
    """
    groups = [(name, tuple(keys)) for name, keys in key_groups.items() if keys]
    if not groups:
        return
    with translated("the access check at start"):
        async with client.pipeline(transaction=False) as pipe:
            for _, keys in groups:
                pipe.execute_command("EVAL", "return 0", len(keys), *keys)
            replies = await pipe.execute(raise_on_error=False)
    for (name, keys), reply in zip(groups, replies, strict=True):
        if isinstance(reply, Exception):
            what = f"the access check at start for {name} (an empty script over its keys: {keys[0]}, ...)"
            with translated(what):
                raise reply
