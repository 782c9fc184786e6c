"""Typed access to the Lua scripts in ``lua/``: loading, EVALSHA with reload on NOSCRIPT, error mapping.

Each script file starts with its KEYS / ARGV / return contract. A line ``--!include _lib.lua`` is replaced by
that file's text when the script is loaded, so shared helpers are written once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from .exceptions import BrokerFull, BrokerUnavailable, SchemaMismatch

__all__ = ("SCRIPT_NAMES", "Script", "command", "load_all", "load_source", "script")

SCRIPT_NAMES = (
    "add",
    "claim",
    "complete",
    "fail",
    "retry",
    "release",
    "renew",
    "recover",
    "watch",
    "retry_failed",
)


async def command(client: aioredis.Redis, *args: Any) -> Any:
    """Send one raw command (redis-py's ``execute_command`` is untyped; this is the one typed doorway)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


@cache
def load_source(name: str) -> str:
    """The Lua source of script ``name`` with its includes expanded."""
    lua_dir = resources.files("qflow") / "lua"
    lines = []
    for line in (lua_dir / f"{name}.lua").read_text(encoding="utf-8").splitlines():
        if line.startswith("--!include "):
            lines.append((lua_dir / line.split(maxsplit=1)[1].strip()).read_text(encoding="utf-8"))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


class Script:
    """One Lua script, called by SHA; reloaded transparently after ``SCRIPT FLUSH`` or a server restart."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = load_source(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Run the script; map connection failures to ``BrokerUnavailable``."""
        try:
            try:
                return await command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
            except rexc.NoScriptError:
                return await command(client, "EVAL", self.source, len(keys), *keys, *args)
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            raise BrokerUnavailable(f"Redis did not answer script {self.name!r}: {exc}") from exc
        except rexc.OutOfMemoryError as exc:
            raise BrokerFull(
                f"Redis refused script {self.name!r}: maxmemory reached ({exc}); nothing was written. Let "
                "workers drain the queues, lower retention, or raise maxmemory; retrying later is safe"
            ) from exc
        except rexc.ResponseError as exc:
            msg = str(exc)
            if "QFLOW_SCHEMA" in msg:
                raise SchemaMismatch(
                    f"this queue was written with qflow schema {msg.split()[-1]}; this qflow writes a "
                    "different one: upgrade the older side, or migrate the queue"
                ) from exc
            raise


async def load_all(client: aioredis.Redis) -> None:
    """Load every script in one round trip, so the first call of each is not a NOSCRIPT miss."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            for name in SCRIPT_NAMES:
                pipe.script_load(script(name).source)
            await pipe.execute()
    except (rexc.ConnectionError, rexc.TimeoutError) as exc:
        raise BrokerUnavailable(f"Redis did not answer SCRIPT LOAD: {exc}") from exc


@cache
def script(name: str) -> Script:
    """The shared ``Script`` object for ``name`` (built once per process)."""
    return Script(name)
