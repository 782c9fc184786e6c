"""Issue 12 item 4: one job's bad input fails that job alone, once stored.

An envelope whose options are out of range (written by hand, or by another client) fails as a payload error;
the worker and the jobs around it go on.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import qflow
from qflow import _codec
from qflow._settings import MAX_SECONDS
from tests.integration.test_bad_input import assert_counts, failure_of, inject, running_worker


def _stored(**options: Any) -> bytes:
    """An envelope for the ``boom`` processor with these options, written as any msgpack client could."""
    fields = [options.get("attempts"), options.get("timeout"), options.get("backoff")]
    return _codec.encode(["boom", msgspec.Raw(b"\xc0"), *fields])


STORED_OUT_OF_RANGE = {
    "timeout-nan": ({"timeout": float("nan")}, "timeout"),
    "timeout-1e30": ({"timeout": 1e30}, "timeout"),
    "timeout-over-max": ({"timeout": MAX_SECONDS + 1}, "timeout"),
    "attempts-2**63": ({"attempts": 2**63}, "attempts"),
    "attempts-2**64-1": ({"attempts": 2**64 - 1}, "attempts"),
    "backoff-delay-1e306": (
        {"attempts": 3, "backoff": {"kind": "fixed", "delay": 1e306, "max_delay": 1e306}},
        "Backoff delay",
    ),
    "backoff-max-delay-inf": ({"attempts": 3, "backoff": {"max_delay": float("inf")}}, "Backoff max_delay"),
}


@pytest.mark.parametrize(("options", "field"), STORED_OUT_OF_RANGE.values(), ids=STORED_OUT_OF_RANGE.keys())
async def test_a_stored_job_with_an_out_of_range_option_fails_alone_as_payload(
    app: qflow.App, options: dict[str, Any], field: str
) -> None:
    """A stored envelope with a non-finite or out-of-range option fails as "payload" naming the field."""
    q = app.queue("stored")
    ran: list[str] = []

    @q.processor
    async def boom(job: qflow.Job[Any]) -> None:
        ran.append(job.id)
        raise ValueError("boom")

    @q.processor
    async def echo(job: qflow.Job[Any]) -> Any:
        return job.payload

    async with running_worker(app):
        before = await q.add("echo", "before")
        bad = await inject(q, "stored-bad", _stored(**options))
        after = await q.add("echo", "after")
        assert await before.result(timeout=10) == "before"
        failed, kind = await failure_of(bad)
        assert await after.result(timeout=10) == "after"
        late = await q.add("echo", "late")  # added after the failure: the worker still takes jobs
        assert await late.result(timeout=10) == "late"

    assert (failed.error_type, kind) == ("PayloadError", "payload"), failed.message
    assert failed.message.startswith("job envelope cannot be decoded: ")
    assert field in failed.message, failed.message
    assert ran == []  # refused before its handler ran: no attempt spent on it
    await assert_counts(q, completed=3, failed=1)
    assert (await q.stats()).get("retried", 0) == 0
