"""The error tree: one root, grouped like httpx's, drawn in the module docstring, old bases kept."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest

import qflow
from qflow import exceptions

ERRORS = [getattr(exceptions, name) for name in exceptions.__all__ if name != "Retry"]


def _drawn_tree() -> dict[str, str]:
    """Child -> parent, read from the box drawing in ``qflow.exceptions``' docstring."""
    doc = exceptions.__doc__ or ""
    drawing = doc.split("```text\n", 1)[1].split("```", 1)[0]
    parents: dict[int, str] = {}
    found: dict[str, str] = {}
    for line in drawing.splitlines():
        m = re.match(r"^([│ ├└─]*)(\w+)", line)
        assert m, line
        depth = len(m.group(1)) // 4
        parents[depth] = m.group(2)
        if depth:
            found[m.group(2)] = parents[depth - 1]
    return found


def test_the_drawing_is_the_tree() -> None:
    """Every public error is drawn once, under the qflow class it derives from directly."""
    drawn = _drawn_tree()
    assert set(drawn) | {"QflowError"} == {cls.__name__ for cls in ERRORS}
    for cls in ERRORS:
        if cls is qflow.QflowError:
            continue
        (qflow_base,) = [b for b in cls.__bases__ if issubclass(b, qflow.QflowError)]
        assert drawn[cls.__name__] == qflow_base.__name__, cls


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (qflow.ConfigurationError, (qflow.QflowError, ValueError)),
        (qflow.PayloadError, (qflow.QflowError, ValueError)),
        (qflow.PayloadTooLarge, (qflow.PayloadError,)),
        (qflow.UnknownJobName, (qflow.QflowError, LookupError)),
        (qflow.BrokerUnavailable, (qflow.BrokerError, ConnectionError)),
        (qflow.BrokerFull, (qflow.BrokerError,)),
        (qflow.SchemaMismatch, (qflow.BrokerError,)),
        (qflow.JobFailed, (qflow.JobError,)),
        (qflow.JobNotFound, (qflow.JobError, LookupError)),
        (qflow.ResultTimeout, (qflow.JobError, TimeoutError)),
        (qflow.BrokerError, (qflow.QflowError,)),
        (qflow.JobError, (qflow.QflowError,)),
    ],
)
def test_each_error_keeps_its_groups_and_builtin_bases(cls: type[Exception], bases: tuple[type, ...]) -> None:
    """Grouping added BrokerError/JobError without dropping a base user code may catch."""
    for base in bases:
        assert issubclass(cls, base), base
    assert issubclass(cls, qflow.QflowError)


def test_job_errors_carry_the_job_id_and_survive_pickle() -> None:
    """``job_id`` is set by every JobError, and kept through pickle (e.g. a process pool)."""
    failed = qflow.JobFailed("j1", "ValueError", "bad", "tb", kind="timeout")
    not_found = qflow.JobNotFound("no job 'j2'", job_id="j2")
    late = qflow.ResultTimeout("not finished", job_id="j3")
    for exc, job_id in ((failed, "j1"), (not_found, "j2"), (late, "j3")):
        assert exc.job_id == job_id
        back = pickle.loads(pickle.dumps(exc))
        assert (type(back), str(back), back.job_id) == (type(exc), str(exc), job_id)
    back_failed = pickle.loads(pickle.dumps(failed))
    assert (back_failed.kind, back_failed.error_type, back_failed.traceback) == (
        "timeout",
        "ValueError",
        "tb",
    )


def _app() -> qflow.App:
    return qflow.App("redis://127.0.0.1:1/0")


def _processor(**options: Any) -> None:
    @_app().queue("q").processor(**options)
    async def handler(job: qflow.Job[None]) -> None: ...


BAD_SETTINGS: dict[str, Callable[[], object]] = {
    "WorkerSettings lease_ttl": lambda: qflow.WorkerSettings(lease_ttl=0.1),
    "WorkerSettings nan": lambda: qflow.WorkerSettings(check_interval=float("nan")),
    "WorkerSettings max_stalls": lambda: qflow.WorkerSettings(max_stalls=-1),
    "WorkerSettings block_timeout": lambda: qflow.WorkerSettings(block_timeout=61),
    "WorkerSettings claim_batch": lambda: qflow.WorkerSettings(claim_batch=0),
    "WorkerSettings prefetch_window": lambda: qflow.WorkerSettings(prefetch_window=-1),
    "RetentionSettings count": lambda: qflow.RetentionSettings(completed_count=-1),
    "RetentionSettings age": lambda: qflow.RetentionSettings(failed_age=-1.0),
    "Backoff delay": lambda: qflow.Backoff(delay=-1),
    "Backoff max_delay inf": lambda: qflow.Backoff(max_delay=float("inf")),
    "Backoff jitter": lambda: qflow.Backoff(jitter=1.5),
    "Backoff kind": lambda: qflow.Backoff(kind="linear"),  # type: ignore[arg-type]
    "Retry negative": lambda: qflow.Retry(delay=-1),
    "Retry nan": lambda: qflow.Retry(delay=float("nan")),
    "JobOptions attempts": lambda: qflow.JobOptions(attempts=0),
    "JobOptions timeout": lambda: qflow.JobOptions(timeout=float("inf")),
    "App max_payload_bytes": lambda: qflow.App("redis://x", max_payload_bytes=0),
    "App socket_timeout": lambda: qflow.App("redis://x", socket_timeout=0),
    "App prefix": lambda: qflow.App("redis://x", prefix="a{b}"),
    "queue name": lambda: _app().queue("with space"),
    "processor concurrency": lambda: _processor(concurrency=0),
    "processor attempts": lambda: _processor(attempts=0),
    "processor timeout": lambda: _processor(timeout=-1),
    "processor options": lambda: _processor(options={"attempts": 2}),
}


@pytest.mark.parametrize("make", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_bad_settings_and_options_raise_configuration_error(make: Callable[[], object]) -> None:
    """Each bad setting or option raises ConfigurationError: ``except qflow.QflowError`` catches it."""
    with pytest.raises(qflow.ConfigurationError) as info:
        make()
    assert isinstance(info.value, qflow.QflowError)
    assert isinstance(info.value, ValueError)  # code written against the old ValueError keeps working
