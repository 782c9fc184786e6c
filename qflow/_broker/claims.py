"""The claim (``lua/claim.lua``) and the idle fetcher's blocking wait on its queue's wake-ups, with or without
a claim behind it: the only place that knows the claim's KEYS, ARGV and reply, and how a parked wait goes out.

``scripts`` re-exports everything here and merges ``KEYS`` and ``SCRIPTS`` into its own, so callers import
``scripts`` alone (as for ``scripts_admin``).

The idle wait (issue 14). An idle fetcher blocks with ``BZPOPMIN`` on the queue's ``marker`` sorted set, not
on ``wait``: every script that pushes to ``wait`` adds the member ``now``, and a delayed job that becomes the
earliest adds ``due`` (``lua/_lib.lua``). The server hands each member to one blocked fetcher, so one job
wakes one fetcher (``BLMOVE wait wait`` woke every idle fetcher on every push: 8 idle workers and 10 adds
made 90 BLMOVEs). A wake-up carries no job: the fetcher claims after it, in the same round trip when the
claim is queued behind the wait. The wait is sent with ``CLIENT ID`` first, so that ``CLIENT UNBLOCK`` can
end it: at a stop, and at the due time of the earliest delayed job, which the server's own timeout cannot
keep (a blocking command's timeout is checked ``hz`` times a second: 0-100 ms late with the default
``hz 10``, measured on Redis 7.0 and Valkey 9).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from ..exceptions import BrokerUnavailable, QflowError
from .commands import bzpopmin
from .errors import UNAVAILABLE, ErrorReply, NoScript, OutOfMemory, translate
from .evalsha import Script
from .keys import QueueKeys

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = (
    "KEYS",
    "SCRIPTS",
    "ClaimReply",
    "Claimed",
    "Parked",
    "claim",
    "parse_claim",
    "unpack_claimed",
    "wait_parked",
    "wait_then_claim",
)

KEYS: dict[str, Callable[[QueueKeys], tuple[str, ...]]] = {
    "claim": lambda k: (
        k.wait, k.active, k.delayed, k.jobs, k.state, k.tokens, k.attempts, k.stalls, k.seq,
        k.failed, k.errors, k.stats, k.waiters, k.marker, k.timer, k.results, k.expires, k.expired,
    ),
}  # fmt: skip
"""Script name -> the queue keys it takes as ``KEYS``, in order."""

SCRIPTS = {name: Script(name, keys) for name, keys in KEYS.items()}
"""Script name -> its ``Script``."""

_CLAIM = SCRIPTS["claim"]


class Claimed(msgspec.Struct, gc=False):
    """One job a claim leased: raw id, fencing token, raw envelope, attempts spent, times recovered."""

    id: bytes
    token: bytes
    envelope: bytes
    attempts: int
    stalls: int


class ClaimReply(NamedTuple):
    """What ``claim`` returns."""

    next_due_ms: int
    """Milliseconds until the next delayed job is due; -1 when none is delayed. For a claim made with a
    ``fetcher`` id: -1 also when that fetcher does not hold the queue's timer (another idle fetcher times the
    wait, or this one will not wait idle): a value >= 0 says it holds it."""
    waiting: int
    """Jobs left waiting after this claim."""
    jobs: list[Claimed]
    """The jobs leased, in the order they were taken."""


_CLAIM_HEAD = struct.Struct(">IIIII")


def unpack_claimed(packed: bytes) -> list[Claimed]:
    """Split claim.lua's packed jobs: per job a head (id, token and envelope lengths, attempts, stalls), then
    the id, token and envelope bytes. One reply element per batch instead of five per job: the client's reply
    parser was a third of a worker's CPU (issue #6)."""
    unpack = _CLAIM_HEAD.unpack_from
    size = _CLAIM_HEAD.size
    jobs = []
    pos = 0
    end = len(packed)
    while pos < end:
        id_len, token_len, env_len, attempts, stalls = unpack(packed, pos)
        a = pos + size
        b = a + id_len
        c = b + token_len
        pos = c + env_len
        jobs.append(Claimed(packed[a:b], packed[b:c], packed[c:pos], attempts, stalls))
    if pos != end:
        raise ValueError(f"claim reply ends inside a job ({end} bytes, the last job ends at {pos})")
    return jobs


def parse_claim(reply: Any) -> ClaimReply:
    """The raw reply of ``lua/claim.lua``, typed."""
    return ClaimReply(int(reply[0]), int(reply[1]), unpack_claimed(reply[2]))


def _claim_args(
    count: int,
    lease_ms: int,
    promote_limit: int,
    max_envelope: int | None,
    too_large: bytes,
    fetcher: str,
    spare: int,
    hold_ms: int,
    keep_failed: tuple[int, int] | None,
) -> list[Any]:
    keep: tuple[Any, Any] = ("", -1) if keep_failed is None else keep_failed
    return [count, lease_ms, promote_limit, "" if max_envelope is None else max_envelope, too_large, fetcher,
            spare, hold_ms, *keep]  # fmt: skip


async def claim(
    client: aioredis.Redis,
    keys: QueueKeys,
    *,
    count: int,
    lease_ms: int,
    promote_limit: int = 1000,
    max_envelope: int | None = None,
    too_large: bytes = b"",
    fetcher: str = "",
    spare: int = 0,
    hold_ms: int = 0,
    keep_failed: tuple[int, int] | None = None,
) -> ClaimReply:
    """Promote up to ``promote_limit`` due delayed jobs, then lease up to ``count`` waiting jobs for
    ``lease_ms`` (``lua/claim.lua``). A job whose envelope is over ``max_envelope`` bytes fails instead, with
    ``too_large`` (an encoded error) as its error.

    A fetcher passes its ``fetcher`` id, the slots it keeps free beside this claim (``spare``) and its
    longest idle wait (``hold_ms``): if it will wait idle after the claim and no other fetcher holds the
    queue's timer, it takes it, and ``next_due_ms`` tells it when to wake (see ``ClaimReply``). ``count=0``
    with ``spare=0`` hands a held timer on (a stopping fetcher).

    A job past its expiry deadline is not leased but recorded ``expired``. ``keep_failed`` (count, age ms;
    -1: no age limit) trims the ``failed`` and ``expired`` sets after jobs failed or expired here; None: no
    trim.
    """
    args = _claim_args(
        count, lease_ms, promote_limit, max_envelope, too_large, fetcher, spare, hold_ms, keep_failed
    )
    return parse_claim(await _CLAIM(client, _CLAIM.keys(keys), args))


class Parked(NamedTuple):
    """What became of a blocking wait (with a claim behind it, or not): ``wait_parked``, ``wait_then_claim``.

    Errors are values: the caller logs them and carries on.
    """

    reply: ClaimReply | None
    """The claim's reply; None without a claim, or when it was refused or its outcome is unknown
    (``claim_error``, ``failed``)."""
    refused: Exception | None = None
    """``CLIENT ID`` was refused (an ACL): nothing can end such a wait early, so cancel it instead."""
    wait_error: Exception | None = None
    """The wait ended at once with this error (``marker`` of the wrong type); the claim, if any, ran."""
    claim_error: Exception | None = None
    """The claim was refused (``BrokerFull``); nothing was claimed."""
    failed: Exception | None = None
    """The connection failed or answered out of turn: the connection was dropped; any job the claim took
    comes back when its lease expires."""


async def wait_parked(
    client: aioredis.Redis, keys: QueueKeys, *, timeout: float, parked: Callable[[int], None]
) -> Parked:
    """Block until a wake-up on ``keys.marker`` (``BZPOPMIN``: it takes one, so one fetcher wakes), or
    ``timeout`` seconds. ``CLIENT ID`` goes in the same write; ``parked(client_id)`` is called once the wait
    is on the server, and ``commands.unblock(client_id)`` ends it early (a stop, a due time)."""
    return await _park(client, keys, timeout, parked, None)


async def wait_then_claim(
    client: aioredis.Redis,
    keys: QueueKeys,
    *,
    timeout: float,
    parked: Callable[[int], None],
    count: int,
    lease_ms: int,
    promote_limit: int = 1000,
    max_envelope: int | None = None,
    too_large: bytes = b"",
    fetcher: str = "",
    spare: int = 0,
    hold_ms: int = 0,
    keep_failed: tuple[int, int] | None = None,
) -> Parked:
    """``wait_parked`` with a claim queued behind the wait, on one connection.

    One write sends ``CLIENT ID``, ``BZPOPMIN marker`` and the claim script; the server runs the claim the
    moment the wait ends (a wake-up, its timeout, or ``CLIENT UNBLOCK``), so an idle worker's pickup costs one
    round trip instead of two. The claim takes the same arguments as ``claim``.
    """
    args = _claim_args(
        count, lease_ms, promote_limit, max_envelope, too_large, fetcher, spare, hold_ms, keep_failed
    )
    return await _park(client, keys, timeout, parked, args)


async def _park(
    client: aioredis.Redis,
    keys: QueueKeys,
    timeout: float,
    parked: Callable[[int], None],
    args: list[Any] | None,
) -> Parked:
    pool = client.connection_pool
    claim_keys = _CLAIM.keys(keys)
    conn = None
    clean = False
    out = Parked(None)
    try:
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        sent = [("CLIENT", "ID"), bzpopmin(keys.marker, timeout)]
        if args is not None:
            sent.append(_CLAIM.evalsha(claim_keys, args))
        await conn.send_packed_command(conn.pack_commands(sent))
        try:
            client_id = await conn.read_response()
        except ErrorReply as exc:
            out = out._replace(refused=exc)
        else:
            if not isinstance(client_id, int):
                raise BrokerUnavailable(f"unexpected reply to CLIENT ID: {client_id!r}")
            parked(client_id)
        try:
            # No explicit read timeout: redis-py answers None (and keeps the connection) when one expires,
            # which would look like the wait's own nil. The wait is shorter than the socket timeout, so a
            # socket timeout here means the server is gone (and disconnects).
            await conn.read_response()
        except ErrorReply as exc:
            out = out._replace(wait_error=translate(exc, "a blocking wait"))
        if args is None:
            clean = True
            return out
        try:
            reply: Any = await conn.read_response()
        except NoScript as exc:
            reply = exc  # nothing was claimed: settle claims now, sending the source
        except OutOfMemory as exc:
            out = out._replace(claim_error=translate(exc, _CLAIM.what))
            reply = None
        clean = True
        if reply is not None:
            out = out._replace(reply=parse_claim(await _CLAIM.settle(client, claim_keys, args, reply)))
    except (*UNAVAILABLE, ErrorReply, QflowError) as exc:
        out = Parked(None, out.refused, out.wait_error, failed=translate(exc, "a blocking wait and claim"))
    finally:
        if conn is not None:
            if not clean:
                # Replies may still be due on it: never hand a half-read connection back to the pool.
                await conn.disconnect(nowait=True)
            await pool.release(conn)
    return out
