"""Ticks of repeatable jobs without a server: cron with seconds and time zones, DST, intervals, catch-up,
declarations, and the contracts of the schedule scripts."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import qflow
from qflow import _cron
from qflow._broker import scripts_schedule
from qflow._broker.evalsha import load_source
from qflow._broker.keys import QueueKeys, ScheduleKeys
from qflow._cron import Cron, Due, Interval, due
from qflow._schedule import ScheduleSpec, decode_spec, job_id
from tests.unit.test_broker import header_keys

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def ms(*args: int, tz: tzinfo = BERLIN, fold: int = 0) -> int:
    """Unix ms of a wall-clock time in ``tz`` (``fold=1``: the second pass of a repeated hour)."""
    return int(datetime(*args, tzinfo=tz, fold=fold).timestamp() * 1000)  # type: ignore[misc]


def walk(ticks: _cron.Ticks, start: int, n: int, tz: ZoneInfo = BERLIN) -> list[str]:
    """The next ``n`` ticks after ``start``, as ISO times in ``tz``."""
    out = []
    for tick in ticks.iter_after(start):
        out.append(datetime.fromtimestamp(tick / 1000, tz).isoformat())
        if len(out) == n:
            return out
    return out


# -- cron: fields, seconds, zones --------------------------------------------------------------------------


def test_six_fields_put_seconds_first() -> None:
    """``*/15 * * * * *`` ticks every 15 seconds on the minute's quarters, in UTC by default."""
    start = ms(2024, 1, 1, 12, 0, 7, tz=UTC)
    assert walk(Cron("*/15 * * * * *"), start, 4, ZoneInfo("UTC")) == [
        "2024-01-01T12:00:15+00:00",
        "2024-01-01T12:00:30+00:00",
        "2024-01-01T12:00:45+00:00",
        "2024-01-01T12:01:00+00:00",
    ]


def test_next_tick_is_strictly_after_the_instant_even_on_a_tick() -> None:
    """A tick exactly at ``ms`` is not "after" it; a tick one ms later is."""
    c = Cron("* * * * * *")
    t = ms(2024, 5, 1, 0, 0, 0, tz=UTC)
    assert c.after(t) == t + 1000
    assert c.after(t - 1) == t
    assert c.latest(t) == t
    assert c.latest(t + 999) == t
    assert c.latest(t - 1) == t - 1000


def test_five_fields_tick_on_the_minute_in_the_given_zone() -> None:
    """``0 9 * * 1-5`` in New York is 09:00 local on weekdays, whatever UTC says."""
    start = ms(2024, 1, 5, 10, 0, tz=NEW_YORK)  # a Friday, after 09:00
    assert walk(Cron("0 9 * * 1-5", "America/New_York"), start, 2, NEW_YORK) == [
        "2024-01-08T09:00:00-05:00",
        "2024-01-09T09:00:00-05:00",
    ]


@pytest.mark.parametrize(("alias", "fields"), [("@hourly", "0 * * * *"), ("@DAILY", "0 0 * * *")])
def test_aliases_spell_out_their_fields(alias: str, fields: str) -> None:
    """``@hourly`` and friends (any case) tick as their five fields do."""
    start = ms(2024, 2, 3, 4, 5, tz=UTC)
    assert walk(Cron(alias), start, 3) == walk(Cron(fields), start, 3)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "Bad minute"),
        ("* * *", "has 3 fields"),
        ("0 0 30 2 *", "Bad day-of-month"),
        ("", "non-empty"),
        ("* * * * * * *", "has 7 fields"),
    ],
)
def test_a_bad_expression_is_a_configuration_error_naming_it(expr: str, message: str) -> None:
    """cronsim's refusal becomes a ``ConfigurationError`` naming the expression and what is wrong."""
    with pytest.raises(qflow.ConfigurationError, match=message):
        Cron(expr)


def test_an_unknown_time_zone_is_refused_with_a_hint() -> None:
    """A zone that is no IANA name fails at once, naming it."""
    with pytest.raises(qflow.ConfigurationError, match="unknown time zone 'Mars/Olympus'"):
        Cron("* * * * *", "Mars/Olympus")


def test_without_the_cron_extra_a_cron_expression_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """With cronsim missing, a cron expression raises ``ConfigurationError`` naming ``qflow[cron]``; an
    interval still works."""
    monkeypatch.setitem(sys.modules, "cronsim", None)  # `import cronsim` now raises ImportError
    app = qflow.App("redis://127.0.0.1:1")
    q = app.queue("q")
    with pytest.raises(qflow.ConfigurationError, match=re.escape("pip install 'qflow[cron]'")):

        @q.cron("*/5 * * * *")
        async def report(job: qflow.Job[None]) -> None: ...

    @q.cron(every=60)
    async def sweep(job: qflow.Job[None]) -> None: ...

    assert q.declared_schedules["sweep"].every == 60


# -- daylight saving time -----------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 30 2 * * *"])
def test_fixed_time_runs_once_when_clocks_fall_back(expr: str) -> None:
    """02:30 repeats on 2024-10-27 in Berlin: a fixed-time job runs once that day, at the first 02:30
    (five fields and six alike)."""
    assert walk(Cron(expr, "Europe/Berlin"), ms(2024, 10, 26, 12, 0), 3) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]


@pytest.mark.parametrize("expr", ["30 2 * * *", "0 30 2 * * *"])
def test_fixed_time_in_the_spring_gap_runs_just_after_it(expr: str) -> None:
    """02:30 does not exist on 2024-03-31 in Berlin: that day the job runs at 03:00, then at 02:30 again."""
    assert walk(Cron(expr, "Europe/Berlin"), ms(2024, 3, 30, 12, 0), 3) == [
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]


def test_a_frequent_job_runs_at_every_instant_of_the_repeated_hour() -> None:
    """``*/30 * * * *`` is not fixed-time: the repeated hour's half hours are distinct instants, all run."""
    assert walk(Cron("*/30 * * * *", "Europe/Berlin"), ms(2024, 10, 27, 1, 50), 6) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T02:30:00+01:00",
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T03:30:00+01:00",
    ]


def test_a_frequent_job_skips_the_hour_that_does_not_exist() -> None:
    """Every 30 minutes across the spring gap: 01:30, then 03:00 (02:00 and 02:30 never happen)."""
    assert walk(Cron("*/30 * * * *", "Europe/Berlin"), ms(2024, 3, 31, 1, 10), 3) == [
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T03:30:00+02:00",
    ]


def test_fixed_time_from_inside_the_second_pass_never_goes_back() -> None:
    """From 02:15 in the second pass of the repeated hour, 02:30 (first pass) is past: the next tick is the
    next day, and the latest tick is the first pass's 02:30 (cronsim alone answers a past time here)."""
    c = Cron("30 2 * * *", "Europe/Berlin")
    second_pass = ms(2024, 10, 27, 2, 15, fold=1)
    assert c.after(second_pass) == ms(2024, 10, 28, 2, 30)
    assert c.latest(second_pass) == ms(2024, 10, 27, 2, 30)
    assert c.latest(ms(2024, 10, 27, 2, 29)) == ms(2024, 10, 26, 2, 30)


def test_latest_tick_after_the_spring_gap_is_the_shifted_one() -> None:
    """Looking back from 03:30 on the gap day, the latest ``30 2 * * *`` tick is the 03:00 run."""
    c = Cron("30 2 * * *", "Europe/Berlin")
    assert c.latest(ms(2024, 3, 31, 3, 30)) == ms(2024, 3, 31, 3, 0)


@pytest.mark.parametrize("month", [3, 11])
def test_ticks_are_strictly_increasing_across_a_transition(month: int) -> None:
    """Over the weeks around New York's 2024 transitions, fixed-time and frequent expressions alike never
    repeat an instant or go back."""
    for expr in ("30 1 * * *", "0 */20 1-2 * * *", "*/45 * * * *", "0 0 1 * * *"):
        c = Cron(expr, "America/New_York")
        last = ms(2024, month, 1, 0, 0, tz=NEW_YORK)
        for tick in c.iter_after(last):
            assert tick > last, expr
            last = tick
            if last > ms(2024, month, 15, 0, 0, tz=NEW_YORK):
                break


# -- intervals and catch-up ---------------------------------------------------------------------------------


def test_intervals_tick_at_multiples_since_the_epoch() -> None:
    """``every=7s`` ticks at the multiples of 7000 ms, wherever it starts from: any process agrees."""
    i = Interval(7000)
    assert i.after(0) == 7000
    assert i.after(6999) == 7000
    assert i.after(7000) == 14000
    assert i.latest(13999) == 7000
    assert i.latest(14000) == 14000


def test_nothing_is_due_before_the_cursor() -> None:
    """A cursor in the future is not due."""
    assert due(Interval(1000), 5000, 4999) is None


def test_due_collapses_missed_ticks_into_the_latest() -> None:
    """Ticks 1 s apart from 10 s to 15.5 s: the job is for 15 s, 5 ticks before it were missed, next 16 s."""
    expected = Due(tick=15_000, skipped=5, next=16_000)
    assert due(Interval(1000), 10_000, 15_500) == expected
    assert due(Cron("* * * * * *"), 10_000, 15_500) == expected


def test_an_on_time_tick_skips_nothing() -> None:
    """Fired in the tick's own second: nothing missed."""
    assert due(Cron("*/5 * * * * *"), 10_000, 10_004) == Due(tick=10_000, skipped=0, next=15_000)


def test_a_long_outage_jumps_to_the_latest_tick_with_a_counted_lower_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past ``CATCH_UP_LIMIT`` ticks the walk stops counting and jumps to the latest due tick."""
    monkeypatch.setattr(_cron, "CATCH_UP_LIMIT", 10)
    got = due(Cron("* * * * * *"), 1_000, 100_250)
    assert got == Due(tick=100_000, skipped=10, next=101_000, capped=True)


def test_a_cron_that_ends_has_no_next_tick() -> None:
    """A cron that never matches again after the due tick: next is None (the cursor is removed)."""

    class Once:
        def iter_after(self, ms: int):  # type: ignore[no-untyped-def]
            return iter([5000] if ms < 5000 else [])

        def after(self, ms: int) -> int | None:
            return next(self.iter_after(ms), None)

        def latest(self, ms: int) -> int | None:
            return 5000 if ms >= 5000 else None

    assert due(Once(), 5000, 9000) == Due(tick=5000, skipped=0, next=None)


# -- declarations and stored specs --------------------------------------------------------------------------


def test_cron_declares_on_a_processor_and_keeps_its_type() -> None:
    """``@queue.cron`` over ``@queue.processor`` records a declaration by processor name and returns the
    processor; a second declaration with the same id needs ``id=``."""
    q = qflow.App("redis://127.0.0.1:1").queue("q")

    @q.cron("*/5 * * * *", payload=3, tz="Europe/Berlin")
    @q.processor(attempts=2)
    async def count(job: qflow.Job[int]) -> int:
        return job.payload

    assert isinstance(count, qflow.Processor)
    assert q.processors["count"] is count
    decl = q.declared_schedules["count"]
    assert (decl.cron, decl.tz, decl.payload, decl.misfire) == ("*/5 * * * *", "Europe/Berlin", 3, "run_once")
    with pytest.raises(qflow.ConfigurationError, match="already declares a schedule 'count'"):
        q.cron(every=10)(count)
    q.cron(every=10, id="count-fast", payload=1)(count)
    assert sorted(q.declared_schedules) == ["count", "count-fast"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "cron= or every="),
        ({"expr": "* * * * *", "every": 5}, "cron= or every="),
        ({"every": 0.01}, "every must be a finite number >= 0.1"),
        ({"every": float("nan")}, "every must be"),
        ({"every": 5, "misfire": "always"}, "misfire must be one of run_once, skip"),
        ({"every": 5, "misfire_grace": -1}, "misfire_grace must be"),
        ({"every": 5, "tz": "Europe/Berlin"}, "tz= is for cron expressions"),
        ({"every": 5, "id": "has space"}, "invalid schedule id"),
    ],
)
def test_bad_declarations_fail_when_declared(kwargs: dict[str, object], message: str) -> None:
    """Every timing argument is checked at the decorator, with a message naming it."""
    q = qflow.App("redis://127.0.0.1:1").queue("q")
    expr = kwargs.pop("expr", None)
    with pytest.raises(qflow.ConfigurationError, match=message):

        @q.cron(expr, **kwargs)  # type: ignore[arg-type]
        async def job(job: qflow.Job[None]) -> None: ...


def test_a_declared_payload_is_checked_when_a_worker_starts() -> None:
    """A payload that does not fit the processor's type fails the worker's start, not a tick."""
    app = qflow.App("redis://127.0.0.1:1")
    q = app.queue("q")

    @q.cron(every=60, payload="not a number")
    @q.processor
    async def count(job: qflow.Job[int]) -> None: ...

    with pytest.raises(qflow.PayloadError, match="does not match int"):
        qflow.Worker(app)


def test_the_stored_spec_round_trips_and_encodes_deterministically() -> None:
    """The same declaration encodes to the same bytes (an upsert of it changes nothing); a spec decodes."""
    q1 = qflow.App("redis://127.0.0.1:1").queue("q")
    q2 = qflow.App("redis://127.0.0.1:1").queue("q")
    for q in (q1, q2):

        @q.cron("0 9 * * *", tz="Europe/Berlin", payload={"b": 1, "a": [1, 2]}, misfire="skip")
        @q.processor
        async def report(job: qflow.Job[dict[str, list[int] | int]]) -> None: ...

    p1 = q1.declared_schedules["report"].prepare(q1)
    p2 = q2.declared_schedules["report"].prepare(q2)
    assert (p1.spec_bytes, p1.envelope) == (p2.spec_bytes, p2.envelope)
    spec = decode_spec(p1.spec_bytes)
    assert spec == ScheduleSpec("report", "0 9 * * *", None, "Europe/Berlin", "skip", 60_000)
    assert spec.grace == 60_000
    assert job_id("report", 1_700_000_000_000) == "sched:report:1700000000000"


# -- the scripts' contracts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(scripts_schedule.KEYS))
def test_each_schedule_script_takes_the_keys_its_header_names_in_order(name: str) -> None:
    """``scripts_schedule.KEYS[name]`` is the script header's KEYS list; every key shares the queue's tag."""
    names, notify_from = header_keys(load_source(name))
    assert notify_from is None
    sent = scripts_schedule.KEYS[name](QueueKeys("p", "q"))
    assert [key.removeprefix("p:{q}:") for key in sent] == names
    assert all(key.startswith("p:{q}:") for key in sent)


@pytest.mark.parametrize("name", sorted(scripts_schedule.KEYS))
def test_each_schedule_script_states_its_contract_and_uses_keys_only(name: str) -> None:
    """Every schedule script documents KEYS/ARGV/returns and never builds a key name from a string."""
    head = load_source(name).split("\n\n", 1)[0]
    assert "KEYS[1]" in head
    assert "ARGV[" in head
    assert "Returns:" in head
    assert not re.search(r"redis\.call\('[A-Z]+',\s*[^K,)][^,)]*\.\.", load_source(name))


def test_schedule_keys_share_the_queue_tag_and_events_are_fleet_wide() -> None:
    """A queue's schedule keys carry ``{queue}``; the wake-up stream is one fleet-wide key."""
    k = ScheduleKeys("qflow", "email")
    assert {k.schedules, k.schedule_next, k.schedule_state} == {
        "qflow:{email}:schedules",
        "qflow:{email}:schedule_next",
        "qflow:{email}:schedule_state",
    }
    assert k.events == ScheduleKeys("qflow", "other").events == "qflow:{#fleet}:schedule_events"


def test_intervals_reject_a_non_positive_step() -> None:
    """``Interval`` needs a whole number of ms >= 1."""
    with pytest.raises(qflow.ConfigurationError):
        Interval(0)
    assert Interval(1).after(timedelta(seconds=1) // timedelta(milliseconds=1)) == 1001


def test_the_python_blocks_of_the_scheduling_page_run() -> None:
    """docs/scheduling.md's examples declare what they say (no server: declaring does no I/O)."""
    from tests.docs.markdown_blocks import blocks

    page = Path(__file__).resolve().parents[2] / "docs" / "scheduling.md"
    namespace: dict[str, object] = {}
    code = [b for b in blocks(page) if b.lang == "python"]
    assert code
    for block in code:
        exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
    reports = namespace["reports"]
    assert isinstance(reports, qflow.Queue)
    assert sorted(reports.declared_schedules) == ["send_report", "sweep"]
    assert reports.declared_schedules["sweep"].misfire == "skip"
