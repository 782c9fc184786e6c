"""Loading the Lua scripts in ``lua/`` and calling them by SHA, with the one NOSCRIPT fallback.

A line ``--!include _lib.lua`` in a script is replaced by that file's text when the script is loaded, so
shared helpers are written once. Calls go by SHA. A server that lost a script (``SCRIPT FLUSH``, a restart)
answers NOSCRIPT, and the call is sent again with the source: ``Script.settle`` is the one place that
happens, whether the EVALSHA went alone, in a pipeline (lease renewal) or behind a blocking wait
(``scripts.wait_then_claim``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any

from .commands import command
from .errors import NoScript, translated

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .keys import QueueKeys

__all__ = ("Script", "expand_source", "load", "load_source")


@cache
def load_source(name: str) -> str:
    """The Lua source of script ``name`` with its includes expanded."""
    return expand_source(resources.files(__package__ or "qflow._broker") / "lua", name)


def expand_source(lua_dir: Traversable, name: str) -> str:
    """The text of ``lua_dir/name.lua`` with each ``--!include FILE`` line replaced by that file's text.

    Any folder of scripts, not only this package's: ``benchmarks/server_cpu.py`` measures other trees' too.
    """
    lines = []
    for line in (lua_dir / f"{name}.lua").read_text(encoding="utf-8").splitlines():
        if line.startswith("--!include "):
            lines.append((lua_dir / line.split(maxsplit=1)[1].strip()).read_text(encoding="utf-8"))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


class Script:
    """One Lua script, called by SHA; reloaded transparently after ``SCRIPT FLUSH`` or a server restart.

    The source is read on first use, not at import.
    """

    __slots__ = ("_sha", "keys", "name", "what")

    def __init__(self, name: str, keys: Callable[[QueueKeys], tuple[str, ...]]) -> None:
        self.name = name
        self.keys = keys
        """The queue keys the script takes as ``KEYS``, in order."""
        self.what = f"script {name!r}"
        self._sha = ""

    @property
    def source(self) -> str:
        """The Lua text sent with ``EVAL`` and ``SCRIPT LOAD``."""
        return load_source(self.name)

    @property
    def sha(self) -> str:
        """The SHA1 of ``source``, for ``EVALSHA``."""
        if not self._sha:
            self._sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        return self._sha

    def evalsha(self, keys: Sequence[str | bytes], args: Sequence[Any]) -> tuple[Any, ...]:
        """The ``EVALSHA`` command, to send in a pipeline or on a connection of one's own."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(self, client: aioredis.Redis, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Run the script and return its raw reply; errors come out as qflow's (see ``errors``)."""
        with translated(self.what):
            try:
                return await command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
            except NoScript as exc:
                missing: BaseException = exc
        return await self.settle(client, keys, args, missing)

    async def settle(
        self, client: aioredis.Redis, keys: Sequence[str | bytes], args: Sequence[Any], reply: Any
    ) -> Any:
        """The reply of this script's ``EVALSHA``, sent some other way, as ``__call__`` would return it.

        NOSCRIPT: the server lost the script and ran nothing; it is sent again with its source, in one more
        round trip (not ``SCRIPT LOAD`` then ``EVALSHA``: two). Any other error reply is raised as qflow's.
        """
        if isinstance(reply, NoScript):
            with translated(self.what):
                return await command(client, "EVAL", self.source, len(keys), *keys, *args)
        if isinstance(reply, BaseException):
            with translated(self.what):
                raise reply
        return reply


async def load(client: aioredis.Redis, scripts: Iterable[Script]) -> None:
    """``SCRIPT LOAD`` every script in one round trip, so the first call of each is not a NOSCRIPT miss."""
    with translated("SCRIPT LOAD"):
        async with client.pipeline(transaction=False) as pipe:
            for s in scripts:
                pipe.script_load(s.source)
            await pipe.execute()
