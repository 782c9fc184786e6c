"""Type-only checks of the repeatable-job API (run by mypy --strict; never executed by pytest)."""

from __future__ import annotations

from datetime import timedelta
from typing import assert_type

import msgspec

import qflow

app = qflow.App("redis://127.0.0.1:6379/0")
reports = app.queue("reports")


class Report(msgspec.Struct):
    kind: str


@reports.cron("0 9 * * 1-5", tz="Europe/Berlin", payload=Report("daily"))
@reports.processor(attempts=3)
async def send_report(job: qflow.Job[Report]) -> int:
    return 1


@reports.cron(every=timedelta(minutes=5), misfire="skip", misfire_grace=30)
async def sweep(job: qflow.Job[None]) -> None:
    """A handler without @processor: cron registers it."""


@reports.cron("*/10 * * * * *", id="ping")
def ping(job: qflow.Job[int]) -> str:
    return "pong"


assert_type(send_report, qflow.Processor[Report, int])
assert_type(sweep, qflow.Processor[None, None])
assert_type(ping, qflow.Processor[int, str])


async def upsert_from_anywhere() -> None:
    s = await reports.schedule("weekly", "send_report", Report("weekly"), cron="0 8 * * 1")
    assert_type(s, qflow.Schedule)
    assert_type(s.next_run, float | None)
    assert_type(await reports.unschedule("weekly"), bool)
    assert_type(await reports.schedules(), list[qflow.Schedule])
