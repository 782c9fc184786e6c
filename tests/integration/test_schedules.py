"""Repeatable jobs against a real server: upsert, change, remove and list from any process; fire's
compare-and-set; misfire policies after an outage; the in-worker scheduler's wake-ups and its idle cost."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import qflow
from qflow._broker import commands, scripts_schedule
from qflow._broker.keys import ScheduleKeys
from qflow._broker.scripts_schedule import Outcome
from qflow._schedule import job_id
from qflow.testing import FAST
from tests.support import running, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
HOUR = 3_600_000

pytestmark = pytest.mark.timeout(60)


def ticking_app(url: str, prefix: str, seen: list[tuple[str, Any]], **app_kwargs: Any) -> qflow.App:
    """An App whose queue ``sched`` has a processor ``tick`` recording (job id, payload) in ``seen``."""
    app = qflow.App(url, prefix=prefix, worker=FAST, **app_kwargs)
    q = app.queue("sched")

    @q.processor(concurrency=10)
    async def tick(job: qflow.Job[Any]) -> None:
        seen.append((job.id, job.payload))

    return app


def tick_of(jid: str) -> int:
    """The tick (ms) in a scheduled job's id."""
    return int(jid.rsplit(":", 1)[1])


async def state(app: qflow.App, schedule_id: str) -> qflow.Schedule:
    """The stored schedule ``schedule_id`` of queue ``sched``."""
    found = {s.id: s for s in await app.queue("sched").schedules(payloads=True)}
    return found[schedule_id]


async def away_from_an_hour_boundary(app: qflow.App) -> int:
    """Wait (polling the server's clock) until the server is at least 10 s past and 10 s before a whole
    hour; return its time (ms). Hourly ticks are then all far from now, whatever the test does next."""
    client = app.redis()
    while True:
        now = await commands.server_ms(client)
        if 10_000 <= now % HOUR <= HOUR - 10_000:
            return now
        await asyncio.sleep(0.1)


def run_python(code: str, url: str, prefix: str) -> Any:
    """Run ``code`` in another Python process with ``URL`` and ``PREFIX`` set; return its JSON output."""
    env = {**os.environ, "URL": url, "PREFIX": prefix, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


OTHER_PROCESS = """
import asyncio, json, os, msgspec, qflow
async def main():
    async with qflow.App(os.environ["URL"], prefix=os.environ["PREFIX"]) as app:
        q = app.queue("sched")
        out = {}
        %s
        print(json.dumps(msgspec.to_builtins(out)))
asyncio.run(main())
"""


# -- upsert, change, remove, list ---------------------------------------------------------------------------


async def test_upsert_list_and_unschedule_from_other_processes(redis_url: str, prefix: str) -> None:
    """A schedule upserted in one process is listed in this one and another; removed from a third, it is
    gone everywhere. Its first tick is the next 03:00 in Berlin after the server's now."""
    upserted = run_python(
        OTHER_PROCESS
        % 'out["s"] = await q.schedule("nightly", "report", {"x": 1}, cron="0 3 * * *", tz="Europe/Berlin")',
        redis_url,
        prefix,
    )["s"]
    async with qflow.App(redis_url, prefix=prefix) as app:
        (listed,) = await app.queue("sched").schedules(payloads=True)
        now = await commands.server_ms(app.redis())
    assert listed.id == upserted["id"] == "nightly"
    assert (listed.name, listed.cron, listed.tz) == ("report", "0 3 * * *", "Europe/Berlin")
    assert listed.payload == {"x": 1}
    assert listed.next_run == upserted["next_run"]
    assert listed.next_run is not None
    assert 0 < listed.next_run * 1000 - now <= 24 * HOUR + HOUR  # the next 03:00 (a DST day is 25 h)
    local = datetime.fromtimestamp(listed.next_run, ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute, local.second) == (3, 0, 0)
    other = run_python(OTHER_PROCESS % 'out["ids"] = [s.id for s in await q.schedules()]', redis_url, prefix)
    assert other["ids"] == ["nightly"]
    twice = 'out["r"] = [await q.unschedule("nightly"), await q.unschedule("nightly")]'
    removed = run_python(OTHER_PROCESS % twice, redis_url, prefix)
    assert removed["r"] == [True, False]
    async with qflow.App(redis_url, prefix=prefix) as app:
        assert await app.queue("sched").schedules() == []


async def test_the_same_upsert_again_changes_nothing_and_a_change_restarts_at_the_next_tick(
    app: qflow.App,
) -> None:
    """Upserting identical arguments keeps version and cursor (and announces nothing); a new payload takes
    a new version; remove then re-add never reuses a version."""
    q = app.queue("sched")
    events = ScheduleKeys(app.prefix, "sched").events
    first = await q.schedule("s", "job", 1, every=3600)
    assert await app.redis().xlen(events) == 1
    again = await q.schedule("s", "job", 1, every=3600)
    assert (again.version, again.next_run) == (first.version, first.next_run)
    assert await app.redis().xlen(events) == 1, "an unchanged upsert wakes no scheduler"
    changed = await q.schedule("s", "job", 2, every=3600)
    assert changed.version > first.version
    assert (await state(app, "s")).payload == 2
    assert await q.unschedule("s")
    readded = await q.schedule("s", "job", 2, every=3600)
    assert readded.version > changed.version, "a version is never reused after a removal"


async def test_upsert_checks_the_job_like_add(app: qflow.App) -> None:
    """With processors declared, an unknown job name or a payload of the wrong type is refused before
    anything is written, as ``add`` refuses them."""
    q = app.queue("sched")

    @q.processor
    async def count(job: qflow.Job[int]) -> None: ...

    with pytest.raises(qflow.UnknownJobName):
        await q.schedule("s", "nope", 1, every=60)
    with pytest.raises(qflow.PayloadError):
        await q.schedule("s", "count", "one", every=60)
    assert await q.schedules() == []


# -- fire: the compare-and-set ------------------------------------------------------------------------------


async def test_twenty_concurrent_fires_of_one_tick_create_one_job(app: qflow.App) -> None:
    """Twenty fires of the same due tick on twenty connections at once: one creates the job and moves the
    cursor, nineteen find the cursor moved (their reply carries the new one)."""
    q = app.queue("sched")
    s = await q.schedule("s", "job", None, every=0.5)
    assert s.next_run is not None
    cursor = round(s.next_run * 1000)
    await wait_until(lambda: _reached(app, cursor), timeout=5, what="the tick")
    clients = [qflow.App(app.url, prefix=app.prefix) for _ in range(20)]
    try:
        args = {"cursor": cursor, "tick": cursor, "next_tick": cursor + 500, "skipped": 0, "grace_ms": -1}
        jid = job_id("s", cursor)
        replies = await asyncio.gather(
            *(
                scripts_schedule.fire(c.redis(), q.keys, "s", version=s.version, job_id=jid, **args)
                for c in clients
            )
        )
    finally:
        for c in clients:
            await c.close()
    fired = [r for r in replies if r.outcome is Outcome.FIRED]
    stale = [r for r in replies if r.outcome is Outcome.STALE]
    assert len(fired) == 1
    assert fired[0].created
    assert len(stale) == 19
    assert {(r.version, r.cursor) for r in stale} == {(s.version, cursor + 500)}
    assert await q.counts() == {
        "waiting": 1,
        "active": 0,
        "delayed": 0,
        "completed": 0,
        "failed": 0,
        "expired": 0,
    }
    after = await state(app, "s")
    assert (after.fired, after.missed, after.last_tick) == (1, 0, cursor / 1000)


async def _reached(app: qflow.App, ms: int) -> bool:
    return await commands.server_ms(app.redis()) >= ms


async def test_fire_refuses_a_tick_the_server_has_not_reached(app: qflow.App) -> None:
    """However a client's clock runs, a tick the server's clock has not reached creates nothing."""
    q = app.queue("sched")
    s = await q.schedule("s", "job", None, every=3600)
    assert s.next_run is not None
    cursor = round(s.next_run * 1000)
    res = await scripts_schedule.fire(
        app.redis(), q.keys, "s", version=s.version, cursor=cursor, tick=cursor, next_tick=cursor + HOUR,
        skipped=0, grace_ms=-1, job_id=job_id("s", cursor),
    )  # fmt: skip
    assert res.outcome is Outcome.EARLY
    assert 0 < res.wait_ms <= HOUR
    assert (await state(app, "s")).next_run == s.next_run
    assert (await q.counts())["waiting"] == 0


async def test_fire_of_an_old_version_or_a_removed_schedule_changes_nothing(app: qflow.App) -> None:
    """A process still computing with the previous spec, or with a schedule since removed, is told so."""
    q = app.queue("sched")
    old = await q.schedule("s", "job", 1, every=0.1)
    new = await q.schedule("s", "job", 2, every=0.1)
    assert old.next_run is not None
    cursor = round(old.next_run * 1000)
    await wait_until(lambda: _reached(app, cursor + 300), timeout=5, what="the tick")
    args = {"cursor": cursor, "tick": cursor, "next_tick": cursor + 100, "skipped": 0, "grace_ms": -1}
    res = await scripts_schedule.fire(app.redis(), q.keys, "s", version=old.version, job_id="x", **args)
    assert (res.outcome, res.version) == (Outcome.STALE, new.version)
    await q.unschedule("s")
    res = await scripts_schedule.fire(app.redis(), q.keys, "s", version=new.version, job_id="x", **args)
    assert (res.outcome, res.version, res.cursor) == (Outcome.STALE, None, None)
    assert (await q.counts())["waiting"] == 0


# -- misfire policies after an outage -----------------------------------------------------------------------


async def outage(app: qflow.App, schedule_id: str, ticks: int) -> int:
    """Pretend every worker was down over the last ``ticks`` hourly ticks of ``schedule_id``: put its
    cursor back (as if nothing had fired since). Returns the latest due tick (ms)."""
    now = await away_from_an_hour_boundary(app)
    latest = now // HOUR * HOUR
    cursors = ScheduleKeys(app.prefix, "sched").schedule_next
    await app.redis().zadd(cursors, {schedule_id: latest - ticks * HOUR})
    return latest


async def test_run_once_creates_one_job_for_the_ticks_missed_during_an_outage(
    redis_url: str, prefix: str
) -> None:
    """Six hourly ticks came due while no worker ran: the first worker back creates one job, for the latest
    of them, counts five missed, and moves on to the next hour."""
    seen: list[tuple[str, Any]] = []
    app = ticking_app(redis_url, prefix, seen)
    q = app.queue("sched")
    await q.schedule("hourly", "tick", "p", every=3600)
    latest = await outage(app, "hourly", 5)
    async with running(qflow.Worker(app)):
        await wait_until(lambda: seen, timeout=5, what="the catch-up job")
        after = await state(app, "hourly")
    assert seen == [(job_id("hourly", latest), "p")]
    assert (after.fired, after.missed, after.last_tick, after.next_run) == (
        1, 5, latest / 1000, (latest + HOUR) / 1000,
    )  # fmt: skip
    await app.close()


async def test_skip_drops_a_due_tick_later_than_its_grace_and_runs_one_within_it(
    redis_url: str, prefix: str
) -> None:
    """After the same outage, ``skip`` with a 1 s grace creates nothing (the latest tick is at least 10 s
    late) and counts all six missed; with a two-hour grace the latest tick still runs."""
    seen: list[tuple[str, Any]] = []
    app = ticking_app(redis_url, prefix, seen)
    q = app.queue("sched")
    await q.schedule("strict", "tick", "strict", every=3600, misfire="skip", misfire_grace=1)
    await q.schedule("lenient", "tick", "lenient", every=3600, misfire="skip", misfire_grace=7200)
    latest = await outage(app, "strict", 5)
    assert await outage(app, "lenient", 5) == latest
    async with running(qflow.Worker(app)):
        await wait_until(lambda: seen, timeout=5, what="the lenient schedule's job")
        await wait_until(
            lambda: _all_moved(app, latest + HOUR), timeout=5, what="both cursors on the next hour"
        )
        strict, lenient = await state(app, "strict"), await state(app, "lenient")
    assert seen == [(job_id("lenient", latest), "lenient")]
    assert (strict.fired, strict.missed, strict.last_tick) == (0, 6, latest / 1000)
    assert (lenient.fired, lenient.missed) == (1, 5)
    await app.close()


async def _all_moved(app: qflow.App, cursor: int) -> bool:
    return all(s.next_run == cursor / 1000 for s in await app.queue("sched").schedules())


# -- the scheduler in the workers ---------------------------------------------------------------------------


async def test_two_workers_create_exactly_one_job_per_tick(redis_url: str, prefix: str) -> None:
    """Two worker processes' schedulers (two Apps, two pools) race on every tick of a 0.1 s interval: each
    tick gets exactly one job, none is missed, ticks are consecutive."""
    seen: list[tuple[str, Any]] = []
    apps = [ticking_app(redis_url, prefix, seen) for _ in range(2)]
    async with running(qflow.Worker(apps[0])), running(qflow.Worker(apps[1])):
        s = await apps[0].queue("sched").schedule("fast", "tick", None, every=0.1)
        await wait_until(lambda: len(seen) >= 20, timeout=10, what="20 ticks")
        await apps[0].queue("sched").unschedule("fast")
    ticks = sorted(tick_of(jid) for jid, _ in seen)
    assert len(ticks) == len(set(ticks)), "a tick got two jobs"
    assert s.next_run is not None
    assert ticks[0] == round(s.next_run * 1000)
    assert ticks == list(range(ticks[0], ticks[-1] + 1, 100)), "a tick was missed"
    for a in apps:
        await a.close()


async def test_an_upsert_from_elsewhere_wakes_idle_workers_at_once(redis_url: str, prefix: str) -> None:
    """A worker with nothing scheduled learns of a new schedule from the event stream, not from its
    60 s re-read: the first tick, 0.2 s after the upsert at most, gets its job within a second."""
    seen: list[tuple[str, Any]] = []
    app = ticking_app(redis_url, prefix, seen)
    async with running(qflow.Worker(app)) as run, qflow.App(redis_url, prefix=prefix) as producer:
        assert run.worker.scheduler is not None
        scheduler = run.worker.scheduler
        await wait_until(lambda: scheduler.reloads >= 1, timeout=5, what="the scheduler's first read")
        t0 = time.monotonic()
        await producer.queue("sched").schedule("new", "tick", None, every=0.2)
        await wait_until(lambda: seen, timeout=5, what="the first job")
        waited = time.monotonic() - t0
    assert waited < 1.0, f"first job {waited:.2f}s after the upsert"
    assert scheduler.reloads >= 2, "woken by the event stream, which made it read the schedules again"
    await app.close()


async def test_a_change_is_followed_and_a_removal_stops_the_ticks(redis_url: str, prefix: str) -> None:
    """Changing a running schedule's payload and interval takes effect from the next tick; once removed,
    nothing more fires (watched for ten of its intervals)."""
    seen: list[tuple[str, Any]] = []
    app = ticking_app(redis_url, prefix, seen)
    q = app.queue("sched")
    async with running(qflow.Worker(app)):
        await q.schedule("s", "tick", "old", every=0.1)
        await wait_until(lambda: len(seen) >= 2, timeout=5, what="two old ticks")
        await q.schedule("s", "tick", "new", every=0.3)
        await wait_until(lambda: any(p == "new" for _, p in seen), timeout=5, what="a new tick")
        new_ticks = [tick_of(j) for j, p in seen if p == "new"]
        assert all(t % 300 == 0 for t in new_ticks)
        assert await q.unschedule("s")
        count = len(seen)
        quiet_until = time.monotonic() + 1.0
        await wait_until(lambda: time.monotonic() > quiet_until, timeout=2, what="a quiet second")
        assert len(seen) == count, "a removed schedule fired"
    await app.close()


async def test_workers_upsert_their_declarations_once_however_many_start(redis_url: str, prefix: str) -> None:
    """Three workers declaring the same ``@queue.cron`` start together: one version, one event, one job
    per tick; a worker that restarts changes nothing."""
    seen: list[tuple[str, Any]] = []

    def declaring_app() -> qflow.App:
        app = qflow.App(redis_url, prefix=prefix, worker=FAST)
        q = app.queue("sched")

        @q.cron("* * * * * *", id="every-second", payload={"k": 1})
        @q.processor
        async def tick(job: qflow.Job[dict[str, int]]) -> None:
            seen.append((job.id, job.payload))

        return app

    apps = [declaring_app() for _ in range(3)]
    async with running(qflow.Worker(apps[0])), running(qflow.Worker(apps[1])), running(qflow.Worker(apps[2])):
        await wait_until(lambda: len(seen) >= 2, timeout=5, what="two ticks")
        async with running(qflow.Worker(apps[0])):  # a restart: its declaration is upserted again
            await wait_until(lambda: len(seen) >= 3, timeout=5, what="a third tick")
        s = await state(apps[0], "every-second")
    ticks = [tick_of(j) for j, _ in seen]
    assert len(ticks) == len(set(ticks))
    assert all(p == {"k": 1} for _, p in seen)
    assert s.version == 1
    assert await apps[0].redis().xlen(ScheduleKeys(prefix, "sched").events) == 1
    for a in apps:
        await a.close()


async def test_a_worker_with_no_schedule_only_waits_on_the_event_stream(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no schedule anywhere, a worker's scheduler reads the schedules once at start, then only blocks
    on the event stream (0.8 x socket timeout per wait): no fire, no re-read, no polling."""
    calls: dict[str, int] = {"read": 0, "fire": 0, "wait_event": 0}
    for name in calls:
        real = getattr(scripts_schedule, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(scripts_schedule, name, counted)
    seen: list[tuple[str, Any]] = []
    app = ticking_app(redis_url, prefix, seen, socket_timeout=0.5)  # waits of 0.4 s
    async with running(qflow.Worker(app)):
        t0 = time.monotonic()
        await wait_until(lambda: time.monotonic() - t0 > 2.0, timeout=3, what="two seconds")
    assert calls["read"] == 1
    assert calls["fire"] == 0
    assert 4 <= calls["wait_event"] <= 7, calls  # 2 s / 0.4 s, give or take the first and the last
    await app.close()


async def test_qflow_schedules_lists_them_as_a_table_and_as_json(redis_url: str, prefix: str) -> None:
    """``qflow schedules --url --prefix`` shows each schedule's spec, next run, counts and misfire policy;
    ``--json`` the same fields as ``Queue.schedules``."""
    async with qflow.App(redis_url, prefix=prefix) as app:
        q = app.queue("sched")
        await q.schedule("nightly", "report", None, cron="0 3 * * *", tz="Europe/Berlin", misfire="skip")
        await q.schedule("often", "sweep", {"deep": True}, every=90)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFLOW_")}
    base = [sys.executable, "-m", "qflow", "schedules", "--url", redis_url, "--prefix", prefix]

    def cli(*args: str) -> str:
        done = subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout

    table = await asyncio.to_thread(cli)
    assert "cron 0 3 * * * (Europe/Berlin)" in table
    assert "every 90s" in table
    assert "skip (grace 60s)" in table
    assert "run_once" in table
    assert "(in " in table
    listed = {s["id"]: s for s in json.loads(await asyncio.to_thread(cli, "--json", "--payloads"))}
    assert listed["often"]["every"] == 90
    assert listed["often"]["payload"] == {"deep": True}
    assert listed["nightly"]["misfire"] == "skip"
    assert listed["nightly"]["next_run"] > time.time() - 60


async def test_a_fired_job_wakes_an_idle_worker_rather_than_waiting_for_its_next_look(
    redis_url: str, prefix: str
) -> None:
    """A job the scheduler creates wakes one idle fetcher (``fire.lua`` writes the queue's marker): with
    ``block_timeout`` 5 s, each tick's job starts well under a second after its tick on the server clock."""
    app = qflow.App(redis_url, prefix=prefix, worker=qflow.WorkerSettings(block_timeout=5.0))
    q = app.queue("sched")
    late_ms: list[int] = []

    @q.processor(concurrency=2)
    async def tick(job: qflow.Job[Any]) -> None:
        late_ms.append(await commands.server_ms(app.redis()) - tick_of(job.id))

    async with running(qflow.Worker(app)):
        await q.schedule("woken", "tick", None, every=1.0)
        await wait_until(lambda: len(late_ms) >= 3, timeout=10, what="3 ticks")
        await q.unschedule("woken")
    assert max(late_ms[:3]) < 1000, f"started {late_ms[:3]} ms after their ticks"
    await app.close()
