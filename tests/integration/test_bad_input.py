"""Issue #2, "bad input gets a clear error and loses nothing" (DESIGN guarantee 7).

Each kind of bad input gets its own test, which checks two things: the specific error (refused by ``add``
before anything is written, or a failed job with the reason), and that the good jobs around it all complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import qflow
from qflow import _codec
from qflow._broker import scripts
from qflow.testing import FAST, drain

MIB = 1024 * 1024

# add() must give up within a few socket timeouts (0.5 s here): redis-py's own retries are off (they nest and
# multiplied a silent server's timeout ~9x); qflow retries a refused connection once. Wide margin for CI.
BROKER_BOUND = 3.0


class Welcome(msgspec.Struct):
    user_id: int


def _nested(depth: int) -> list[Any]:
    """A list nested ``depth`` levels deep (built in a loop: a recursive builder would hit the limit)."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


async def stored_keys(app: qflow.App) -> list[bytes]:
    """Every Redis key under the app's prefix."""
    return [key async for key in app.redis().scan_iter(match=f"{app.prefix}:*", count=1000)]


async def assert_counts(queue: qflow.Queue, **expected: int) -> None:
    """``queue.counts()`` equals ``expected``, with every state not named there at zero."""
    want = dict.fromkeys(("waiting", "active", "delayed", "completed", "failed", "expired"), 0) | expected
    assert await queue.counts() == want


async def inject(queue: qflow.Queue, job_id: str, envelope: bytes) -> qflow.Job[Any]:
    """Store raw envelope bytes as a waiting job through the add script, as a rogue producer would."""
    created = await scripts.add(queue.app.redis(), queue.keys, [scripts.NewJob(job_id, envelope)])
    assert created == [True]
    return queue.job(job_id)


async def failure_of(job: qflow.Job[Any]) -> tuple[qflow.JobFailed, str]:
    """The ``JobFailed`` that ``job.result()`` raises, and its error kind (checked against the stored one)."""
    with pytest.raises(qflow.JobFailed) as caught:
        await job.result(timeout=10)
    raw = await job.queue.app.redis().hget(job.queue.keys.errors, job.id)
    assert isinstance(raw, bytes)
    assert caught.value.kind == _codec.decode_error(raw).kind
    return caught.value, caught.value.kind


@contextlib.asynccontextmanager
async def running_worker(app: qflow.App) -> AsyncIterator[qflow.Worker]:
    """A long-running (non-burst) worker; on exit it must still be running, then it is stopped and joined."""
    worker = qflow.Worker(app, settings=FAST)
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(10):
            await worker.ready.wait()
        yield worker
        assert not task.done(), "the worker stopped on its own"
    finally:
        worker.stop()
        async with asyncio.timeout(10):
            await task  # re-raises whatever crashed the worker


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def tcp_listener(*, hang_up: bool) -> AsyncIterator[str]:
    """A local TCP server that accepts and then never replies (or, with ``hang_up``, closes at once)."""
    writers: list[asyncio.StreamWriter] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        if hang_up:
            writer.close()
            return
        await reader.read()  # swallow the commands; answer nothing, until the client gives up

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


# -- refused by add: nothing written ----------------------------------------------------------------------


async def test_payload_over_small_limit_is_refused_and_nothing_written(redis_url: str, prefix: str) -> None:
    """With max_payload_bytes=100, 101 bytes raise PayloadTooLarge and write nothing; 100 bytes pass."""
    async with qflow.App(redis_url, prefix=prefix, max_payload_bytes=100, worker=FAST) as app:
        q = app.queue("small")

        @q.processor
        async def echo(job: qflow.Job[bytes]) -> int:
            return len(job.payload)

        # b"x" * n encodes as msgpack bin8: 2 header bytes + n.
        with pytest.raises(qflow.PayloadTooLarge, match=r"101 bytes, over max_payload_bytes=100") as caught:
            await q.add("echo", b"x" * 99, job_id="big")
        assert isinstance(caught.value, qflow.PayloadError)
        assert await stored_keys(app) == []

        before = await q.add("echo", b"x" * 98)
        with pytest.raises(qflow.PayloadTooLarge):
            await q.add("echo", b"x" * 99, job_id="big")
        after = await echo.add(b"y" * 10)
        assert await q.job("big").status() is None
        await assert_counts(q, waiting=2)

        await drain(app)
        assert await before.result(timeout=5) == 98
        assert await after.result(timeout=5) == 10
        await assert_counts(q, completed=2)
        assert await app.redis().hlen(q.keys.jobs) == 2


async def test_payload_over_default_one_mib_is_refused_and_nothing_written(app: qflow.App) -> None:
    """By default a payload encoding to 1 MiB + 1 byte raises PayloadTooLarge; exactly 1 MiB is accepted."""
    assert app.max_payload_bytes == MIB
    q = app.queue("blobs")

    @q.processor
    async def size(job: qflow.Job[bytes]) -> int:
        return len(job.payload)

    # Over 64 KiB, bytes encode as msgpack bin32: 5 header bytes + n.
    with pytest.raises(qflow.PayloadTooLarge, match=r"1,048,577 bytes, over max_payload_bytes=1,048,576"):
        await q.add("size", b"x" * (MIB - 4))
    assert await stored_keys(app) == []

    exactly = await q.add("size", b"x" * (MIB - 5))
    with pytest.raises(qflow.PayloadTooLarge):
        await size.add(b"x" * (2 * MIB))
    small = await q.add("size", b"ok")
    await assert_counts(q, waiting=2)

    await drain(app)
    assert await exactly.result(timeout=5) == MIB - 5
    assert await small.result(timeout=5) == 2
    await assert_counts(q, completed=2)


async def test_producer_only_app_enforces_the_payload_limit(redis_url: str, prefix: str) -> None:
    """An app with no processors declared (an API process) refuses oversized payloads the same way."""
    async with qflow.App(redis_url, prefix=prefix, max_payload_bytes=100) as producer:
        q = producer.queue("jobs")
        with pytest.raises(qflow.PayloadTooLarge, match=r"over max_payload_bytes=100"):
            await q.add("anything", "x" * 200)
        with pytest.raises(qflow.PayloadError, match=r"cannot be encoded"):
            await q.add("anything", object())
        assert await stored_keys(producer) == []
        await q.add("anything", "fits")
        await assert_counts(q, waiting=1)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({"user_id": "42"}, "user_id", id="wrong-field-type"),
        pytest.param({}, "user_id", id="missing-field"),
        pytest.param({"user_id": None}, "user_id", id="null-field"),
        pytest.param("user 42", None, id="not-an-object"),
        pytest.param(None, None, id="none"),
    ],
)
async def test_wrong_type_payload_for_struct_processor_is_refused_naming_the_field(
    app: qflow.App, payload: object, field: str | None
) -> None:
    """A payload not fitting the processor's Struct raises PayloadError naming the field; nothing written."""
    q = app.queue("email")

    @q.processor(attempts=3)
    async def welcome(job: qflow.Job[Welcome]) -> int:
        return job.payload.user_id

    with pytest.raises(qflow.PayloadError, match=r"email:welcome: payload does not match Welcome") as caught:
        await q.add("welcome", payload)
    # qflow's contract is the class of the cause and the field it names, not msgspec's wording.
    assert isinstance(caught.value.__cause__, msgspec.ValidationError)
    if field is not None:
        assert field in str(caught.value)
    assert not isinstance(caught.value, qflow.PayloadTooLarge)
    assert await stored_keys(app) == []

    before = await q.add("welcome", {"user_id": 1})
    with pytest.raises(qflow.PayloadError):
        await q.add("welcome", payload, job_id="bad")
    after = await welcome.add(Welcome(user_id=2))
    assert await q.job("bad").status() is None
    await drain(app)
    assert [await before.result(timeout=5), await after.result(timeout=5)] == [1, 2]
    await assert_counts(q, completed=2)


@pytest.mark.parametrize(
    ("payload", "cause"),
    [
        pytest.param(object(), TypeError, id="object"),
        pytest.param({"a": [1, object()]}, TypeError, id="nested-object"),
        pytest.param(2**70, OverflowError, id="int-over-64-bits"),
        pytest.param(_nested(100_000), RecursionError, id="100k-deep-list"),
    ],
)
async def test_unencodable_payload_is_refused_and_nothing_written(
    app: qflow.App, payload: object, cause: type[Exception]
) -> None:
    """A payload msgspec cannot encode raises PayloadError at add; nothing is written, good jobs still run."""
    q = app.queue("plain")

    @q.processor
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    with pytest.raises(
        qflow.PayloadError, match=r"plain:echo: payload cannot be encoded with msgspec"
    ) as caught:
        await q.add("echo", payload)
    assert isinstance(caught.value.__cause__, cause)
    assert caught.match(f"with msgspec: {cause.__name__}: ")
    assert await stored_keys(app) == []

    before = await q.add("echo", {"n": 1})
    with pytest.raises(qflow.PayloadError):
        await q.add("echo", payload, job_id="bad")
    after = await q.add("echo", [2])
    assert await q.job("bad").status() is None
    await drain(app)
    assert await before.result(timeout=5) == {"n": 1}
    assert await after.result(timeout=5) == [2]
    await assert_counts(q, completed=2)


async def test_set_payload_is_encodable_and_arrives_as_a_list(app: qflow.App) -> None:
    """A set is not bad input: msgpack has no set type, so it is stored as an array and arrives as a list."""
    q = app.queue("plain")

    @q.processor
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    job = await q.add("echo", {3})
    await drain(app)
    assert await job.result(timeout=5) == [3]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        pytest.param(qflow.JobSpec("blob", b"x" * 200), qflow.PayloadTooLarge, id="too-large"),
        pytest.param(qflow.JobSpec("welcome", {"user_id": "x"}), qflow.PayloadError, id="wrong-type"),
        pytest.param(qflow.JobSpec("blob", object()), qflow.PayloadError, id="unencodable"),
        pytest.param(qflow.JobSpec("nope", b""), qflow.UnknownJobName, id="unknown-name"),
        pytest.param(qflow.JobSpec("blob", b"", attempts=0), qflow.ConfigurationError, id="bad-option"),
    ],
)
async def test_add_bulk_with_one_bad_item_writes_none(
    redis_url: str, prefix: str, bad: qflow.JobSpec, error: type[Exception]
) -> None:
    """One bad job in add_bulk, even in the second 500-job chunk, raises and writes none of the batch."""
    async with qflow.App(redis_url, prefix=prefix, max_payload_bytes=100, worker=FAST) as app:
        q = app.queue("bulk")

        @q.processor(concurrency=50)
        async def blob(job: qflow.Job[bytes]) -> int:
            return len(job.payload)

        @q.processor
        async def welcome(job: qflow.Job[Welcome]) -> int:
            return job.payload.user_id

        good = [qflow.JobSpec("blob", b"%d" % i) for i in range(600)]
        with pytest.raises(error):
            await q.add_bulk([*good[:550], bad, *good[550:]])
        assert await stored_keys(app) == []

        jobs = await q.add_bulk(good)
        await assert_counts(q, waiting=600)
        await drain(app)
        await assert_counts(q, completed=600)
        assert await jobs[599].result(timeout=5) == 3


async def test_unknown_job_name_is_refused_at_add_naming_it(app: qflow.App) -> None:
    """``add`` naming no processor of the queue raises UnknownJobName with that name; nothing is written."""
    q = app.queue("email")

    @q.processor
    async def welcome(job: qflow.Job[Welcome]) -> int:
        return job.payload.user_id

    with pytest.raises(
        qflow.UnknownJobName, match=r"no processor named 'welcom'.*registered: welcome"
    ) as caught:
        await q.add("welcom", {"user_id": 1})
    assert isinstance(caught.value, LookupError)
    assert await stored_keys(app) == []

    before = await q.add("welcome", {"user_id": 1})
    with pytest.raises(qflow.UnknownJobName):
        await q.add("welcom", {"user_id": 2}, job_id="typo")
    after = await q.add("welcome", {"user_id": 3})
    assert await q.job("typo").status() is None
    await drain(app)
    assert [await before.result(timeout=5), await after.result(timeout=5)] == [1, 3]
    await assert_counts(q, completed=2)


# -- injected into Redis: the job fails with the reason, the worker goes on -------------------------------


def _env(name: bytes, payload: bytes) -> bytes:
    """Envelope bytes by hand: a msgpack array of [name, payload], ``name`` already msgpack-encoded."""
    return b"\x92" + name + payload


_ECHO = msgspec.msgpack.encode("echo")
_WELCOME = msgspec.msgpack.encode("welcome")
_ENVELOPE = "job envelope cannot be decoded: "
# qflow's contract for a stored job it cannot decode: the message says which part failed (the envelope, or the
# payload of which job as which type) and names the decode error's class; the text after that is msgspec's and
# changes between its releases (0.23 reports invalid UTF-8 as DecodeError, older ones as UnicodeDecodeError).
_CAUSES = "|".join(cls.__name__ for cls in _codec.DECODE_ERRORS)


def _payload_of(job: str, typ: str) -> str:
    return f"payload of job {job} cannot be decoded as {typ}: "


# (test id, envelope bytes, the part qflow names, a field the message must name or None)
HOSTILE_CASES: list[tuple[str, bytes, str, str | None]] = [
    ("garbage-bytes", b"\xc1garbage", _ENVELOPE, None),
    ("empty", b"", _ENVELOPE, None),
    ("truncated-payload", _env(_WELCOME, b"\x81\xa7user_id"), _ENVELOPE, None),
    ("non-utf8-str-payload", _env(_ECHO, b"\xa2\xff\xfe"), _payload_of("inbox:echo", "Any"), None),
    ("non-utf8-name", _env(b"\xa2\xff\xfe", b"\x01"), _ENVELOPE, None),
    # The envelope decoder already walks the raw payload, so nesting trips it before the payload decoder.
    ("100k-deep-payload", _env(_ECHO, b"\x91" * 100_000 + b"\xc0"), _ENVELOPE, None),
    ("pickle-envelope", pickle.dumps(Welcome(user_id=1)), _ENVELOPE, None),
    ("pickle-payload", _env(_WELCOME, pickle.dumps({"user_id": 1})), _ENVELOPE, None),
    (
        "wrong-type-payload",
        _env(_WELCOME, msgspec.msgpack.encode({"user_id": "1"})),
        _payload_of("inbox:welcome", "Welcome"),
        "user_id",
    ),
    ("non-str-name", _env(b"\x7b", b"\x01"), _ENVELOPE, None),
    ("envelope-not-an-array", msgspec.msgpack.encode({"name": "echo"}), _ENVELOPE, None),
]
HOSTILE = [pytest.param(env, part, field, id=case_id) for case_id, env, part, field in HOSTILE_CASES]


@pytest.mark.parametrize(("envelope", "part", "field"), HOSTILE)
async def test_undecodable_injected_job_fails_with_payload_error_and_worker_keeps_running(
    app: qflow.App, envelope: bytes, part: str, field: str | None
) -> None:
    """Hostile bytes stored as a job make that job fail (kind "payload"); good jobs on both sides complete."""
    q = app.queue("inbox")

    @q.processor(attempts=3)
    async def welcome(job: qflow.Job[Welcome]) -> int:
        return job.payload.user_id

    @q.processor(attempts=3)
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    async with running_worker(app):
        before = await q.add("welcome", {"user_id": 1})
        bad = await inject(q, "hostile", envelope)
        after = await q.add("echo", "still here")
        assert await before.result(timeout=10) == 1
        failed, kind = await failure_of(bad)
        assert await after.result(timeout=10) == "still here"
        late = await q.add("welcome", {"user_id": 4})  # added after the failure: the worker still takes jobs
        assert await late.result(timeout=10) == 4

    assert failed.error_type == "PayloadError"
    assert re.match(f"{re.escape(part)}({_CAUSES}): ", failed.message), failed.message
    if field is not None:
        assert field in failed.message
    assert kind == "payload"
    await assert_counts(q, completed=3, failed=1)
    stats = await q.stats()
    assert stats.get("retried", 0) == 0  # a payload error is permanent: no attempt is retried
    assert stats["failed"] == 1


async def test_many_hostile_jobs_in_one_claim_batch_lose_no_good_job(app: qflow.App) -> None:
    """Every hostile envelope and 20 good jobs, interleaved and claimed in batches: all good jobs complete."""
    q = app.queue("inbox")

    @q.processor(concurrency=10)
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    @q.processor(concurrency=10)
    async def welcome(job: qflow.Job[Welcome]) -> int:
        return job.payload.user_id

    good: list[qflow.Job[Any]] = []
    bad: list[qflow.Job[Any]] = []
    for i, (case_id, envelope, _, _) in enumerate(HOSTILE_CASES):
        good.append(await q.add("echo", i))
        bad.append(await inject(q, f"hostile-{case_id}", envelope))
        good.append(await q.add("welcome", {"user_id": i}))
    await drain(app)

    assert [await j.result(timeout=5) for j in good] == [v for i in range(len(HOSTILE_CASES)) for v in (i, i)]
    for j in bad:
        failed, kind = await failure_of(j)
        assert (failed.error_type, kind) == ("PayloadError", "payload"), j.id
    await assert_counts(q, completed=len(good), failed=len(bad))


async def test_injected_job_with_non_utf8_id_does_not_crash_the_worker(app: qflow.App) -> None:
    """A non-UTF-8 job id (only a raw write makes one) ends that job, not the worker; no job is lost."""
    # Regression: the fetcher once decoded claimed ids strictly, so such an id ended Worker.run and left the
    # job active for the next worker to crash on. Ids now travel back to Redis as the exact bytes claimed.
    q = app.queue("inbox")

    @q.processor
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    k = q.keys
    bad_id = b"\xff\xfe-not-utf8"
    before = await q.add("echo", 1)
    created = await scripts.add(app.redis(), k, [scripts.NewJob(bad_id, msgspec.msgpack.encode(["echo", 2]))])
    assert created == [True]
    after = await q.add("echo", 3)

    await drain(app)
    assert await before.result(timeout=5) == 1
    assert await after.result(timeout=5) == 3
    assert await app.redis().hget(k.state, bad_id) in (b"completed", b"failed")
    counts = await q.counts()
    assert (counts["waiting"], counts["active"], counts["completed"] + counts["failed"]) == (0, 0, 3)


async def test_injected_job_with_unregistered_name_fails_naming_it(redis_url: str, app: qflow.App) -> None:
    """A job whose name no processor on the worker has fails with that name in the reason, never dropped."""
    q = app.queue("inbox")

    @q.processor
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    # A producer-only app (no processors declared, e.g. a newer API build) may add any name.
    async with qflow.App(redis_url, prefix=app.prefix) as producer:
        pq = producer.queue("inbox")
        before = await pq.add("echo", 1)
        ghost = await pq.add("send_ghost", {"to": "nobody"})
        after = await pq.add("echo", 2)

    async with running_worker(app):
        assert await q.job(before.id).result(timeout=10) == 1
        failed, kind = await failure_of(q.job(ghost.id))
        assert await q.job(after.id).result(timeout=10) == 2

    assert failed.error_type == "UnknownJobName"
    assert "'send_ghost'" in failed.message
    assert "queue 'inbox'" in failed.message
    assert "registered: echo" in failed.message
    assert kind == "unknown_name"
    await assert_counts(q, completed=2, failed=1)


# -- results that cannot be stored -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "cause"),
    [
        pytest.param(object(), TypeError, id="object"),
        pytest.param(2**70, OverflowError, id="int-over-64-bits"),
        pytest.param(_nested(100_000), RecursionError, id="100k-deep-list"),
    ],
)
async def test_unencodable_result_fails_the_job_with_kind_result(
    app: qflow.App, result: object, cause: type[Exception]
) -> None:
    """A return value msgspec cannot encode fails that job (kind "result"); the worker runs the next jobs."""
    q = app.queue("results")

    @q.processor
    async def bad(job: qflow.Job[None]) -> object:
        return result

    @q.processor
    async def good(job: qflow.Job[int]) -> int:
        return job.payload

    async with running_worker(app):
        before = await good.add(1)
        job = await bad.add(None)
        after = await good.add(2)
        failed, kind = await failure_of(job)
        assert [await before.result(timeout=10), await after.result(timeout=10)] == [1, 2]

    assert failed.error_type == "PayloadError"
    assert failed.message.startswith(
        f"result of results:bad: payload cannot be encoded with msgspec: {cause.__name__}: "
    )
    assert kind == "result"
    await assert_counts(q, completed=2, failed=1)


async def test_result_over_max_payload_bytes_fails_the_job_with_kind_result(
    redis_url: str, prefix: str
) -> None:
    """A return value over max_payload_bytes fails that job with PayloadTooLarge (kind "result")."""
    async with qflow.App(redis_url, prefix=prefix, max_payload_bytes=1000, worker=FAST) as app:
        q = app.queue("results")

        @q.processor
        async def big(job: qflow.Job[int]) -> str:
            return "x" * job.payload

        async with running_worker(app):
            before = await big.add(10)
            job = await big.add(2000)
            after = await big.add(20)
            failed, kind = await failure_of(job)
            assert await before.result(timeout=10) == "x" * 10
            assert await after.result(timeout=10) == "x" * 20

        assert failed.error_type == "PayloadTooLarge"
        assert "result of results:big" in failed.message
        assert "over max_payload_bytes=1,000" in failed.message
        assert kind == "result"
        await assert_counts(q, completed=2, failed=1)


# -- an unreachable or silent server ----------------------------------------------------------------------


async def _assert_gives_up_in_bounded_time(url: str) -> None:
    loop = asyncio.get_running_loop()
    async with qflow.App(url, connect_timeout=0.5, socket_timeout=0.5) as app:
        q = app.queue("q")
        start = loop.time()
        with pytest.raises(qflow.BrokerUnavailable) as caught:
            await q.add("x", 1)
        elapsed = loop.time() - start
        assert isinstance(caught.value, ConnectionError)
        assert elapsed < BROKER_BOUND, f"add took {elapsed:.1f}s to give up"

        # Reading fails the same way: counts() (a pipeline) and result() with no timeout of its own.
        start = loop.time()
        with pytest.raises(qflow.BrokerUnavailable):
            await q.counts()
        with pytest.raises(qflow.BrokerUnavailable):
            await q.job("some-id").result()
        elapsed = loop.time() - start
        assert elapsed < 2 * BROKER_BOUND, f"counts and result took {elapsed:.1f}s to give up"


async def test_add_to_unreachable_server_raises_broker_unavailable_in_bounded_time() -> None:
    """Nothing listening on the port: add raises BrokerUnavailable (a ConnectionError), it does not hang."""
    await _assert_gives_up_in_bounded_time(f"redis://127.0.0.1:{_closed_port()}/0")


async def test_add_to_server_that_hangs_up_raises_broker_unavailable_in_bounded_time() -> None:
    """A server that accepts and closes every connection at once: add raises BrokerUnavailable."""
    async with tcp_listener(hang_up=True) as url:
        await _assert_gives_up_in_bounded_time(url)


async def test_add_to_silent_server_raises_broker_unavailable_in_bounded_time() -> None:
    """A server that accepts but never answers: add raises BrokerUnavailable once socket timeouts expire."""
    async with tcp_listener(hang_up=False) as url:
        await _assert_gives_up_in_bounded_time(url)
