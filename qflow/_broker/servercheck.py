"""What a worker checks about the server at start: a version new enough, and settings that keep promises.

qflow's guarantees hold while Redis keeps acknowledged writes (AOF on) and never evicts keys
(``maxmemory-policy noeviction``); see DESIGN.md. A server that breaks them still works, with a warning.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError
from .errors import translated

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ("check_server",)

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2)  # RPOP with a count and BLMOVE, both used on the hot path


async def check_server(client: aioredis.Redis) -> list[str]:
    """Raise if the server is too old; log and return a warning for each setting that weakens a guarantee."""
    with translated("INFO"):
        info = await client.info()
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
