"""``JobOptions``: one Struct for a processor's defaults and a job's overrides, merged in one place."""

from __future__ import annotations

import warnings
from typing import Any

import msgspec
import pytest

import qflow
from qflow import _codec
from qflow._options import NO_OPTIONS, ResolvedOptions, job_options
from qflow._state import DEFAULT_BACKOFF

FIXED = qflow.Backoff(kind="fixed", delay=0.5)


def _queue() -> qflow.Queue:
    return qflow.App("redis://127.0.0.1:1/0").queue("q")


def test_a_jobs_value_wins_then_the_processors_then_qflows() -> None:
    """``job.over(processor)``: each field from the job if set, else the processor, else qflow's default."""
    processor = qflow.JobOptions(attempts=3, timeout=30.0)
    assert qflow.JobOptions().over(processor) == ResolvedOptions(3, 30.0, DEFAULT_BACKOFF)
    assert qflow.JobOptions(attempts=5, backoff=FIXED).over(processor) == ResolvedOptions(5, 30.0, FIXED)
    assert qflow.JobOptions().over(qflow.JobOptions()) == ResolvedOptions(1, None, DEFAULT_BACKOFF)


def test_keywords_win_over_the_fields_of_options() -> None:
    """``options=`` and keywords combine; a keyword given replaces that field; nothing given is NO_OPTIONS."""
    base = qflow.JobOptions(attempts=2, timeout=5.0)
    assert job_options(base, timeout=9.0) == qflow.JobOptions(attempts=2, timeout=9.0)
    assert job_options(None, attempts=4) == qflow.JobOptions(attempts=4)
    assert job_options(base) is base
    assert job_options(None) is NO_OPTIONS
    with pytest.raises(qflow.ConfigurationError, match=r"options must be a qflow\.JobOptions"):
        job_options({"attempts": 2})  # type: ignore[arg-type]


def test_options_are_keyword_only_and_frozen() -> None:
    """``JobOptions(3)`` is refused (which field?), and a made Struct cannot change."""
    with pytest.raises(TypeError):
        qflow.JobOptions(3)  # type: ignore[call-arg]
    opts = qflow.JobOptions(attempts=3)
    with pytest.raises(AttributeError):
        opts.attempts = 4  # type: ignore[misc]


def test_the_decorator_takes_keywords_or_options_alike() -> None:
    """``@processor(attempts=3, timeout=30)`` and ``@processor(options=JobOptions(...))`` record the same."""
    q = _queue()

    @q.processor(attempts=3, timeout=30, backoff=FIXED)
    async def by_keywords(job: qflow.Job[None]) -> None: ...

    @q.processor(options=qflow.JobOptions(attempts=3, timeout=30, backoff=FIXED))
    async def by_options(job: qflow.Job[None]) -> None: ...

    @q.processor
    async def plain(job: qflow.Job[None]) -> None: ...

    assert (
        by_keywords.options == by_options.options == qflow.JobOptions(attempts=3, timeout=30, backoff=FIXED)
    )
    assert (by_keywords.attempts, by_keywords.timeout, by_keywords.backoff) == (3, 30, FIXED)
    assert (plain.attempts, plain.timeout, plain.backoff) == (1, None, None)


def test_an_envelope_stores_options_flat_in_the_old_layout() -> None:
    """The stored envelope is the same msgpack array as before JobOptions: old jobs read, new ones match."""
    opts = qflow.JobOptions(attempts=2, timeout=1.5, backoff=FIXED)
    new = _codec.encode_envelope(_codec.Envelope.of("send", b"\x01", opts))
    old_layout = msgspec.msgpack.encode(
        [
            "send",
            msgspec.Raw(b"\x01"),
            2,
            1.5,
            {"kind": "fixed", "delay": 0.5, "max_delay": 3600.0, "jitter": 0.0},
        ]
    )
    assert new == old_layout
    assert _codec.decode_envelope(new).options == opts
    # An envelope written with no overrides, and one of only [name, payload], read as "no options".
    empty = msgspec.msgpack.encode(["send", msgspec.Raw(b"\xc0"), None, None, None])
    assert _codec.decode_envelope(empty).options is NO_OPTIONS
    short = msgspec.msgpack.encode(["send", msgspec.Raw(b"\xc0")])
    assert _codec.decode_envelope(short).options is NO_OPTIONS


@pytest.mark.parametrize(
    "stored",
    [[0, None, None], [None, -1.0, None], [None, float("nan"), None], [None, None, {"delay": -1.0}]],
    ids=["attempts-0", "timeout-negative", "timeout-nan", "backoff-negative"],
)
def test_a_stored_option_out_of_range_fails_like_a_bad_payload(stored: list[Any]) -> None:
    """A hand-written envelope with a bad option raises PayloadError at decode: it fails that job only."""
    raw = msgspec.msgpack.encode(["send", msgspec.Raw(b"\xc0"), *stored])
    with pytest.raises(qflow.PayloadError, match="envelope"):
        _codec.decode_envelope(raw)


async def test_enqueue_is_a_deprecated_alias_of_add(monkeypatch: pytest.MonkeyPatch) -> None:
    """``processor.enqueue(...)`` warns DeprecationWarning and passes every argument to ``add``."""
    q = _queue()

    @q.processor
    async def send(job: qflow.Job[int]) -> None: ...

    seen: list[tuple[str, Any, dict[str, Any]]] = []

    async def fake_add(name: str, payload: Any = None, **kwargs: Any) -> qflow.Job[Any]:
        seen.append((name, payload, kwargs))
        return q.job("x")

    monkeypatch.setattr(q, "add", fake_add)
    with pytest.warns(DeprecationWarning, match=r"Processor\.add\(\)"):
        await send.enqueue(7, job_id="j", attempts=2, options=qflow.JobOptions(timeout=3.0))
    assert seen == [
        (
            "send",
            7,
            {
                "job_id": "j",
                "delay": None,
                "run_at": None,
                "options": qflow.JobOptions(attempts=2, timeout=3.0),
                "expires": None,
                "dedup": None,
            },
        ),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await send.add(8)  # the new name does not warn
    assert seen[-1] == (
        "send",
        8,
        {
            "job_id": None,
            "delay": None,
            "run_at": None,
            "options": NO_OPTIONS,
            "expires": None,
            "dedup": None,
        },
    )


def test_app_url_reads_configuration_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``App.url`` is the configured URL (argument, then variables) and never starts a server."""

    def no_server(*args: object, **kwargs: object) -> bool:
        raise AssertionError("reading App.url must not start the embedded server")

    monkeypatch.setattr("qflow._embedded.ensure_running", no_server)
    monkeypatch.delenv("QFLOW_REDIS_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert qflow.App("redis://h:1/0").url == "redis://h:1/0"
    with pytest.raises(qflow.ConfigurationError, match=r"resolve_url\(\)"):
        _ = qflow.App().url
    monkeypatch.setenv("REDIS_URL", "redis://r:2/0")
    assert qflow.App().url == "redis://r:2/0"
    monkeypatch.setenv("QFLOW_REDIS_URL", "redis://q:3/0")
    assert qflow.App().url == qflow.App().resolve_url() == "redis://q:3/0"
