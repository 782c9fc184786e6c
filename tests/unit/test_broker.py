"""The broker layer without a server: script contracts, the claim reply format, and redis-py's errors mapped
to qflow's, including every read of a Queue or Job against a server that is not there."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis import exceptions as rexc

import qflow
from qflow import _inspect
from qflow._broker import scripts
from qflow._broker.errors import is_timeout, translate, translated
from qflow._broker.keys import QueueKeys
from qflow._broker.servercheck import check_server


def header_keys(source: str) -> tuple[list[str], int | None]:
    """The names a script's header gives ``KEYS[1..n]``, and where its per-job notify lists start (if any)."""
    head = source.split("\n\n", 1)[0]
    named = [(int(n), name) for n, name in re.findall(r"KEYS\[(\d+)\]\s+(\w+)", head)]
    assert [n for n, _ in named] == list(range(1, len(named) + 1)), f"KEYS numbered out of order: {named}"
    names = [name for _, name in named]
    notify_from = None
    many = re.search(r"KEYS\[(\d+)\.\.\]\s+the notify list", head)
    if many:
        notify_from = int(many.group(1))
    elif names and names[-1] == "notify":
        notify_from = len(names)
        names.pop()
    return names, notify_from


@pytest.mark.parametrize("name", scripts.SCRIPT_NAMES)
def test_the_broker_passes_each_script_the_keys_its_header_names_in_order(name: str) -> None:
    """``scripts.KEYS[name]`` is the script header's KEYS list: same keys, same order."""
    names, notify_from = header_keys(scripts.load_source(name))
    k = QueueKeys("p", "q")
    sent = [key.removeprefix("p:{q}:") for key in scripts.KEYS[name](k)]
    assert sent == names
    # complete, fail and watch take the notify list of each job after the fixed keys; nothing else does.
    assert notify_from in (None, len(names) + 1)
    assert (notify_from is not None) == (name in ("complete", "fail", "watch"))


def pack(*jobs: tuple[bytes, bytes, bytes, int, int]) -> bytes:
    """claim.lua's packed jobs, as its header describes them."""
    out = b""
    for job_id, token, envelope, attempts, stalls in jobs:
        out += struct.pack(">IIIII", len(job_id), len(token), len(envelope), attempts, stalls)
        out += job_id + token + envelope
    return out


def test_claim_reply_is_parsed_into_typed_jobs() -> None:
    """The packed claim reply becomes a ClaimReply of Claimed jobs with the exact bytes sent."""
    packed = pack((b"a", b"7", b"\x00env", 2, 1), (b"\xff-raw", b"8", b"", 0, 0))
    reply = scripts.parse_claim([-1, 3, packed])
    assert reply.next_due_ms == -1
    assert reply.waiting == 3
    assert [(j.id, j.token, j.envelope, j.attempts, j.stalls) for j in reply.jobs] == [
        (b"a", b"7", b"\x00env", 2, 1),
        (b"\xff-raw", b"8", b"", 0, 0),
    ]
    assert scripts.parse_claim([10, 0, b""]) == (10, 0, [])


def test_a_claim_reply_that_ends_inside_a_job_is_refused() -> None:
    """A truncated packed reply raises instead of handing out a job with a short envelope."""
    with pytest.raises(ValueError, match="ends inside a job"):
        scripts.unpack_claimed(pack((b"a", b"7", b"envelope", 0, 0))[:-1])


def test_connection_and_timeout_errors_become_broker_unavailable() -> None:
    """redis-py's ConnectionError and TimeoutError map to BrokerUnavailable naming what was asked."""
    refused = translate(rexc.ConnectionError("refused"), "INFO")
    silent = translate(rexc.TimeoutError("timed out"), "INFO")
    assert isinstance(refused, qflow.BrokerUnavailable)
    assert isinstance(silent, qflow.BrokerUnavailable)
    assert "INFO" in str(refused)
    with pytest.raises(qflow.BrokerUnavailable) as caught, translated("TIME"):
        raise rexc.TimeoutError("timed out")
    assert is_timeout(caught.value)
    assert isinstance(caught.value.__cause__, rexc.TimeoutError)


def test_out_of_memory_is_found_by_the_replys_class_not_its_text() -> None:
    """The server's OOM reply (OutOfMemoryError) is BrokerFull; other replies mentioning OOM are not."""
    full = translate(rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"), "x")
    assert isinstance(full, qflow.BrokerFull)
    assert "maxmemory" in str(full)
    other = rexc.ResponseError("ERR Error running script: user_function: OOM in the job's own text")
    assert translate(other, "x") is other


def test_schema_reply_becomes_schema_mismatch_and_other_replies_stay() -> None:
    """The add script's QFLOW_SCHEMA reply maps to SchemaMismatch; any other error reply is left alone."""
    mismatch = translate(rexc.ResponseError("QFLOW_SCHEMA 2"), "script 'add'")
    assert isinstance(mismatch, qflow.SchemaMismatch)
    assert "schema 2" in str(mismatch)
    wrongtype = rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    with pytest.raises(rexc.ResponseError), translated("HGET"):
        raise wrongtype


# -- a server that is not there ---------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound once by us, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def gone() -> AsyncIterator[qflow.App]:
    """An App whose Redis URL points at a closed port on 127.0.0.1."""
    app = qflow.App(f"redis://127.0.0.1:{closed_port()}/0", socket_timeout=1.0, connect_timeout=1.0)
    yield app
    await app.close()


READS: dict[str, Callable[[qflow.App], Awaitable[Any]]] = {
    "Queue.counts": lambda app: app.queue("q").counts(),
    "Queue.stats": lambda app: app.queue("q").stats(),
    "Job.status": lambda app: app.queue("q").job("j1").status(),
    "Job.result": lambda app: app.queue("q").job("j1").result(timeout=1.0),
    "Queue.add": lambda app: app.queue("q").add("send", {"to": "a"}),
    "Queue.add_bulk": lambda app: app.queue("q").add_bulk([qflow.JobSpec("send", 1)]),
    "list_workers": _inspect.list_workers,
    "queue_info": lambda app: _inspect.queue_info(app, [app.queue("q")]),
    "discover_queues": _inspect.discover_queues,
    "list_jobs": lambda app: _inspect.list_jobs(app.queue("q"), "failed", 10),
    "Queue.get_job": lambda app: app.queue("q").get_job("j1"),
    "Queue.retry_failed": lambda app: app.queue("q").retry_failed(),
    "Queue.purge": lambda app: app.queue("q").purge(),
    "check_server": lambda app: check_server(app.redis()),
}


@pytest.mark.parametrize("call", READS.values(), ids=READS.keys())
async def test_every_call_against_a_missing_server_raises_broker_unavailable(
    gone: qflow.App, call: Callable[[qflow.App], Awaitable[Any]]
) -> None:
    """Reads and writes of a Queue or Job (stats() too) raise BrokerUnavailable, never redis-py's errors."""
    with pytest.raises(qflow.BrokerUnavailable) as caught:
        await call(gone)
    assert isinstance(caught.value.__cause__, rexc.ConnectionError)
