"""Issue 12 item 4: every number is checked finite and in range where it enters (DESIGN.md, data-model rules).

Each numeric option, fed any int or float, is either accepted, and then survives the trip to where it is used
(the stored envelope, the add script's milliseconds, a Struct's encoding), or refused with qflow's error
naming the field, the range and the value: never a bare ``ValueError``, ``OverflowError`` or ``TypeError``,
never a value that breaks a timer or a script later. Then the specific inputs of the issue, and text that has
no UTF-8 form (item 5), refused before anything is sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qflow
from qflow import _codec
from qflow._settings import (
    MAX_ATTEMPTS,
    MAX_CLAIM_BATCH,
    MAX_CONCURRENCY,
    MAX_COUNT,
    MAX_SECONDS,
    RetentionSettings,
    WorkerSettings,
)
from qflow._state import Backoff, decide_after_error

LUA_EXACT = 2**53
"""Integers above this are not exact in a Lua double: no millisecond value sent to a script may reach it."""

EDGES = [
    0,
    1,
    -1,
    0.5,
    -0.0,
    5e-324,
    MAX_SECONDS,
    MAX_SECONDS + 1,
    MAX_SECONDS + 0.001,
    MAX_ATTEMPTS,
    MAX_ATTEMPTS + 1,
    MAX_COUNT + 1,
    2**53,
    2**63,
    2**64,
    10**30,
    1e30,
    1.7e305,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    False,
]
NUMBERS = st.one_of(
    st.sampled_from(EDGES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
)


def _queue() -> qflow.Queue:
    """A queue on an App that never connects: everything here is refused or prepared before any I/O."""
    return qflow.App("redis://127.0.0.1:1/0").queue("q")


def _round_trip_envelope(options: qflow.JobOptions) -> qflow.JobOptions:
    """Options as a worker reads them back from the stored envelope."""
    return _codec.decode_envelope(_codec.encode_envelope(_codec.Envelope.of("n", b"\xc0", options))).options


def _accepts(field: str, make: Callable[[], Any]) -> Any:
    """``make()``; a refusal must be qflow's error, naming ``field`` and the range (else the test fails)."""
    try:
        return make()
    except qflow.QflowError as exc:
        message = str(exc)
        assert field in message, message
        assert "must be" in message, message
        assert ", got " in message, message
        return None


def _is_duration(value: Any) -> bool:
    """What a duration must be once accepted: a real number, finite, its ms exact in a Lua double."""
    return (
        not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= MAX_SECONDS
        and int(value * 1000) < LUA_EXACT
    )


@given(value=NUMBERS)
def test_job_options_accept_in_range_or_refuse_naming_the_field(value: Any) -> None:
    """``attempts`` and ``timeout``: accepted values are in range and read back equal from the envelope."""
    opts = _accepts("attempts", lambda: qflow.JobOptions(attempts=value))
    if opts is not None:
        assert type(value) is int
        assert 1 <= value <= MAX_ATTEMPTS
        assert _round_trip_envelope(opts) == opts
    opts = _accepts("timeout", lambda: qflow.JobOptions(timeout=value))
    if opts is not None:
        assert _is_duration(value)
        assert value > 0
        assert _round_trip_envelope(opts) == opts


@given(value=NUMBERS, field=st.sampled_from(["delay", "max_delay", "jitter"]))
def test_backoff_accepts_in_range_or_refuses_naming_the_field(value: Any, field: str) -> None:
    """Each ``Backoff`` number: accepted values are in range, give finite waits, and read back equal."""
    backoff = _accepts(f"Backoff {field}", lambda: Backoff(**{field: value}))
    if backoff is not None:
        assert _is_duration(value)
        assert field != "jitter" or value <= 1
        assert all(0 <= backoff.seconds(n) <= MAX_SECONDS for n in (1, 2, 64, 10**6))
        assert _round_trip_envelope(qflow.JobOptions(backoff=backoff)).backoff == backoff


WORKER_FIELDS = {
    "lease_ttl": MAX_SECONDS,
    "check_interval": MAX_SECONDS,
    "max_stalls": MAX_ATTEMPTS,
    "drain_timeout": MAX_SECONDS,
    "block_timeout": 60,
    "claim_batch": MAX_CLAIM_BATCH,
    "prefetch_window": 60,
}
RETENTION_FIELDS = {
    "completed_count": MAX_COUNT,
    "failed_count": MAX_COUNT,
    "completed_age": MAX_SECONDS,
    "failed_age": MAX_SECONDS,
}


@given(value=NUMBERS, field=st.sampled_from(sorted(WORKER_FIELDS)))
def test_worker_settings_accept_in_range_or_refuse_naming_the_field(value: Any, field: str) -> None:
    """Each ``WorkerSettings`` number: accepted ones are finite, at most the bound, and encode back equal."""
    settings = _accepts(field, lambda: WorkerSettings(**{field: value}))
    if settings is not None:
        assert not isinstance(value, bool)
        assert math.isfinite(value)
        assert 0 <= value <= WORKER_FIELDS[field]
        assert int(value * 1000) < LUA_EXACT
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(settings), type=WorkerSettings) == settings


@given(value=NUMBERS, field=st.sampled_from(sorted(RETENTION_FIELDS)))
def test_retention_accepts_in_range_or_refuses_naming_the_field(value: Any, field: str) -> None:
    """Each ``RetentionSettings`` number: accepted values are finite, at most the bound, and encode back."""
    retention = _accepts(field, lambda: RetentionSettings(**{field: value}))
    if retention is not None:
        assert not isinstance(value, bool)
        assert 0 <= value <= RETENTION_FIELDS[field]
        assert int(value * 1000) < LUA_EXACT
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(retention), type=RetentionSettings) == retention


@given(value=NUMBERS, field=st.sampled_from(["delay", "attempts", "timeout"]))
def test_add_accepts_in_range_or_refuses_naming_the_field(value: Any, field: str) -> None:
    """``add``'s numbers (and ``add_bulk``'s ``JobSpec``): accepted ones reach the script exact, in range."""
    q = _queue()
    prepared = _accepts(field, lambda: q._prepare(qflow.JobSpec("n", None, **{field: value})))
    if prepared is None:
        return
    _, new = prepared
    stored = _codec.decode_envelope(bytes(new.envelope)).options
    if field == "delay":
        assert _is_duration(value)
        assert new.delay_ms == int(value * 1000)
        assert 0 <= new.delay_ms < LUA_EXACT
    else:
        assert stored == qflow.JobOptions(**{field: value})


@given(value=NUMBERS)
def test_processor_concurrency_accepts_in_range_or_refuses(value: Any) -> None:
    """``@processor(concurrency=)``: an int from 1 to MAX_CONCURRENCY, else ConfigurationError naming it."""
    q = _queue()

    def declare() -> Any:
        @q.processor(concurrency=value)
        async def handler(job: qflow.Job[None]) -> None: ...

        return handler

    proc = _accepts("concurrency", declare)
    if proc is not None:
        assert type(value) is int
        assert 1 <= value <= MAX_CONCURRENCY
        assert proc.concurrency == value


# msgpack stores ints from -2**63 to 2**64 - 1: what a stored envelope can hold.
STORABLE = st.one_of(
    st.none(),
    st.sampled_from([v for v in EDGES if not isinstance(v, int) or -(2**63) <= v < 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)


@given(attempts=STORABLE, timeout=STORABLE, delay=STORABLE)
def test_a_stored_envelope_decodes_in_range_or_fails_as_payload(
    attempts: Any, timeout: Any, delay: Any
) -> None:
    """Any numbers written into an envelope decode to in-range options, or raise PayloadError naming one."""
    backoff = None if delay is None else {"delay": delay}
    raw = _codec.encode(["send", msgspec.Raw(b"\xc0"), attempts, timeout, backoff])
    try:
        opts = _codec.decode_envelope(raw).options
    except qflow.PayloadError as exc:
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert re.search(r"\battempts\b|\btimeout\b|\bbackoff\b|Backoff delay", refused), refused
        return
    assert opts.attempts is None or (type(opts.attempts) is int and 1 <= opts.attempts <= MAX_ATTEMPTS)
    assert opts.timeout is None or (_is_duration(opts.timeout) and opts.timeout > 0)
    assert opts.backoff is None or _is_duration(opts.backoff.delay)


@given(requested=st.floats(allow_nan=True, allow_infinity=True))
def test_a_retry_delay_reaches_the_script_finite_and_in_range(requested: float) -> None:
    """Whatever ``Retry.delay`` holds when the worker reads it, the decided wait is finite and bounded."""
    decision = decide_after_error(attempts_spent=0, max_attempts=2, backoff=None, requested_delay=requested)
    assert decision.retry
    assert _is_duration(decision.delay)


# -- the inputs of the issue, one by one ---------------------------------------------------------------------

ISSUE_CASES: dict[str, tuple[Callable[[], object], str]] = {
    "timeout nan": (lambda: qflow.JobOptions(timeout=float("nan")), "timeout"),
    "timeout 1e30": (lambda: qflow.JobOptions(timeout=1e30), "timeout"),
    "timeout 2**64": (lambda: qflow.JobOptions(timeout=2**64), "timeout"),
    "attempts 2**64": (lambda: qflow.JobOptions(attempts=2**64), "attempts"),
    "attempts 10**7": (lambda: qflow.JobOptions(attempts=10**7), "attempts"),
    "Backoff delay nan": (lambda: Backoff(delay=float("nan")), "Backoff delay"),
    "Backoff delay 1e306": (lambda: Backoff(delay=1e306), "Backoff delay"),
    "Backoff max_delay 1e308": (lambda: Backoff(max_delay=1e308), "Backoff max_delay"),
    "lease_ttl 1e30": (lambda: WorkerSettings(lease_ttl=1e30), "lease_ttl"),
    "drain_timeout 2**64": (lambda: WorkerSettings(drain_timeout=2**64), "drain_timeout"),
    "claim_batch 2**64": (lambda: WorkerSettings(claim_batch=2**64), "claim_batch"),
    "max_stalls 2**64": (lambda: WorkerSettings(max_stalls=2**64), "max_stalls"),
    "completed_age 1e30": (lambda: RetentionSettings(completed_age=1e30), "completed_age"),
    "failed_count 2**64": (lambda: RetentionSettings(failed_count=2**64), "failed_count"),
    "add delay inf": (lambda: _queue()._prepare(qflow.JobSpec("n", delay=float("inf"))), "delay"),
    "add delay nan": (lambda: _queue()._prepare(qflow.JobSpec("n", delay=float("nan"))), "delay"),
    "add delay 1e308": (lambda: _queue()._prepare(qflow.JobSpec("n", delay=1e308)), "delay"),
    "add delay 2**64": (lambda: _queue()._prepare(qflow.JobSpec("n", delay=2**64)), "delay"),
    "add attempts 2**64": (lambda: _queue()._prepare(qflow.JobSpec("n", attempts=2**64)), "attempts"),
    "add timeout 2**64": (lambda: _queue()._prepare(qflow.JobSpec("n", timeout=2**64)), "timeout"),
    "add timeout 1e30": (lambda: _queue()._prepare(qflow.JobSpec("n", timeout=1e30)), "timeout"),
    "processor concurrency 2**64": (
        lambda: _queue().processor(concurrency=2**64)(lambda job: None),
        "concurrency",
    ),
    "processor timeout 1e30": (lambda: _queue().processor(timeout=1e30)(lambda job: None), "timeout"),
}


@pytest.mark.parametrize(("make", "field"), ISSUE_CASES.values(), ids=ISSUE_CASES.keys())
def test_each_input_of_the_issue_raises_configuration_error_naming_the_field(
    make: Callable[[], object], field: str
) -> None:
    """The issue's numbers: ConfigurationError naming the field, the bound and the value, not a bare error."""
    with pytest.raises(qflow.ConfigurationError, match=rf"^(retention )?{field} must be .*, got ") as caught:
        make()
    assert "<=" in str(caught.value) or "finite" in str(caught.value)


def test_the_largest_values_accepted_still_fit_a_script() -> None:
    """The bounds themselves are accepted, and their milliseconds plus the server clock are exact in Lua."""
    q = _queue()
    _, new = q._prepare(qflow.JobSpec("n", delay=MAX_SECONDS, attempts=MAX_ATTEMPTS, timeout=MAX_SECONDS))
    now_ms = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert new.delay_ms + now_ms < LUA_EXACT
    assert float(new.delay_ms + now_ms) == new.delay_ms + now_ms
    assert Backoff(delay=MAX_SECONDS, max_delay=MAX_SECONDS).seconds(10**6) == MAX_SECONDS


def test_a_huge_int_is_named_not_printed() -> None:
    """An int too long to print (over 4,300 digits) still gets ConfigurationError, not Python's ValueError."""
    with pytest.raises(qflow.ConfigurationError, match=r"attempts must be .*, got an int of [\d,]+ bits"):
        qflow.JobOptions(attempts=10**5000)


class _OffsetIsText(tzinfo):
    def utcoffset(self, dt: datetime | None) -> Any:
        return "+01:00"

    def tzname(self, dt: datetime | None) -> str:
        return "text"

    def dst(self, dt: datetime | None) -> None:
        return None


class _NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str:
        return "none"

    def dst(self, dt: datetime | None) -> None:
        return None


@pytest.mark.parametrize(
    ("run_at", "message"),
    [
        pytest.param(
            datetime(2030, 1, 1, tzinfo=_OffsetIsText()), "run_at .* has no usable time", id="bad-tz"
        ),
        pytest.param(datetime(2030, 1, 1, tzinfo=_NoOffset()), "timezone-aware", id="tz-without-offset"),
        pytest.param(datetime(2030, 1, 1), "timezone-aware", id="naive"),
    ],
)
def test_a_run_at_without_a_usable_offset_is_refused(run_at: datetime, message: str) -> None:
    """A run_at whose tzinfo gives no offset, or not a timedelta, raises ConfigurationError naming run_at."""
    with pytest.raises(qflow.ConfigurationError, match=message):
        _queue()._prepare(qflow.JobSpec("n", run_at=run_at))


def test_run_at_from_year_1_to_9999_reaches_the_script_exact() -> None:
    """The whole datetime range is accepted: before 1970 means now (0), year 9999 stays below 2**53 ms."""
    q = _queue()
    _, early = q._prepare(qflow.JobSpec("n", run_at=datetime(1, 1, 1, tzinfo=UTC)))
    _, late = q._prepare(qflow.JobSpec("n", run_at=datetime.max.replace(tzinfo=UTC)))
    assert early.run_at_ms == 0
    assert 0 < late.run_at_ms < LUA_EXACT


# -- text with no UTF-8 form (item 5): refused before it joins a batch --------------------------------------


@pytest.mark.parametrize("job_id", ["\ud800", "ok-\udfff", "\udcff\udcfe"])
def test_a_job_id_with_a_lone_surrogate_raises_payload_error_at_prepare(job_id: str) -> None:
    """A job_id UTF-8 cannot encode raises PayloadError naming job_id, before anything is batched or sent."""
    with pytest.raises(qflow.PayloadError, match=r"^job_id .* is not valid text"):
        _queue()._prepare(qflow.JobSpec("n", job_id=job_id))


def test_a_job_name_with_a_lone_surrogate_raises_payload_error() -> None:
    """A job name UTF-8 cannot encode (on a producer with no processors) raises PayloadError naming it."""
    with pytest.raises(qflow.PayloadError, match=r"^job name .* is not valid text"):
        _queue()._prepare(qflow.JobSpec("bad\ud800"))


def test_a_processor_name_with_a_lone_surrogate_is_refused_when_declared() -> None:
    """``@processor(name=...)`` with no UTF-8 form raises ConfigurationError at declaration, not at add."""
    with pytest.raises(qflow.ConfigurationError, match=r"^processor name .* is not valid text"):
        _queue().processor(name="\ud800")(lambda job: None)


async def test_admin_ids_with_a_lone_surrogate_are_refused_before_any_io() -> None:
    """``get_job`` and ``retry_failed`` refuse an id with no UTF-8 form with ConfigurationError naming it."""
    q = _queue()
    with pytest.raises(qflow.ConfigurationError, match=r"job id .* is not valid text"):
        await q.get_job("\ud800")
    with pytest.raises(qflow.ConfigurationError, match=r"job id .* is not valid text"):
        await q.retry_failed(["fine", "\ud800"])
    with pytest.raises(qflow.ConfigurationError, match=r"limit must be an int >= 1"):
        await q.retry_failed(limit=float("nan"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"concurrency": 100_001}, "concurrency"),
        ({"max_jobs": math.nan}, "max_jobs"),
        ({"max_jobs": 0}, "max_jobs"),
        ({"max_jobs": 2**64}, "max_jobs"),
    ],
)
def test_worker_refuses_a_bad_concurrency_or_max_jobs_naming_it(kwargs: dict[str, Any], field: str) -> None:
    """``Worker(concurrency=, max_jobs=)`` refuse bools, non-ints, nan and out-of-range values by name."""
    app = qflow.App("redis://127.0.0.1:1")
    app.queue("q").processor()(_noop)
    with pytest.raises(qflow.ConfigurationError, match=rf"^{field} must be an int"):
        qflow.Worker(app, **kwargs)


async def _noop(job: qflow.Job[Any]) -> None:
    """A processor that does nothing."""


def test_retry_delay_bound_is_max_seconds() -> None:
    """``Retry`` keeps the same 100-year ceiling as every other duration (it cannot import it)."""
    assert qflow.exceptions._MAX_RETRY_DELAY == MAX_SECONDS
    qflow.Retry(delay=MAX_SECONDS)
    with pytest.raises(qflow.ConfigurationError, match="Retry delay"):
        qflow.Retry(delay=MAX_SECONDS + 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"socket_timeout": math.nan}, "socket_timeout"),
        ({"socket_timeout": 1e12}, "socket_timeout"),
        ({"connect_timeout": math.inf}, "connect_timeout"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"max_payload_bytes": 1.5}, "max_payload_bytes"),
        ({"max_payload_bytes": 2**40}, "max_payload_bytes"),
    ],
)
def test_app_refuses_bad_timeouts_and_payload_limits_naming_them(kwargs: dict[str, Any], field: str) -> None:
    """``App(socket_timeout=nan)`` and friends raise ``ConfigurationError`` naming the field."""
    with pytest.raises(qflow.ConfigurationError, match=rf"^{field} must be"):
        qflow.App("redis://127.0.0.1:1", **kwargs)
