"""The claim budget of one queue in one worker (``qflow._worker.deliveries.Slots``): claim-ahead sizing."""

from __future__ import annotations

import asyncio

from qflow._worker.deliveries import Slots


def test_no_claim_ahead_before_any_handler_finished() -> None:
    slots = Slots(4, window=0.05)
    assert slots.ahead == 0
    assert slots.free() == 4


def test_short_jobs_get_a_full_concurrency_of_claim_ahead() -> None:
    slots = Slots(4, window=0.05)
    slots.observe(0.001)
    assert slots.ahead == 4
    assert slots.free() == 8


def test_claim_ahead_shrinks_as_jobs_get_longer_and_vanishes_for_long_ones() -> None:
    slots = Slots(10, window=0.05)
    slots.observe(0.1)  # ten running, each 0.1 s: five more start within 0.05 s
    assert slots.ahead == 5
    long = Slots(1, window=0.05)
    long.observe(0.2)
    assert long.ahead == 0
    assert long.free() == 1


def test_window_zero_turns_claim_ahead_off() -> None:
    slots = Slots(3, window=0)
    slots.observe(0.0001)
    assert slots.ahead == 0


def test_average_moves_towards_recent_run_times() -> None:
    slots = Slots(1, window=0.05)
    slots.observe(1.0)
    for _ in range(60):
        slots.observe(0.001)
    assert slots.average is not None
    assert slots.average < 0.01
    assert slots.ahead == 1


async def test_take_waits_for_a_slot_and_respects_the_budget() -> None:
    slots = Slots(2, window=0)
    stop = asyncio.Event()
    assert await slots.take(5, stop) == 2
    waiter = asyncio.create_task(slots.take(5, stop))
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.give(1)
    assert await asyncio.wait_for(waiter, 1) == 1
    slots.give(2)
    assert await slots.take(5, stop, budget=lambda: 1) == 1
    capped = asyncio.create_task(slots.take(5, stop, budget=lambda: 0))
    await asyncio.sleep(0)
    assert not capped.done()
    stop.set()
    assert await asyncio.wait_for(capped, 1) == 0


async def test_take_batches_claims_while_jobs_wait_in_line() -> None:
    slots = Slots(8, window=0)  # limit 8: a batch is 2
    stop = asyncio.Event()
    assert await slots.take(8, stop) == 8
    in_line = 3
    slots.give(1)
    waiter = asyncio.create_task(slots.take(8, stop, queued=lambda: in_line))
    await asyncio.sleep(0)
    assert not waiter.done()  # one free slot while jobs wait in line: not worth a claim yet
    slots.give(1)
    assert await asyncio.wait_for(waiter, 1) == 2
    slots.give(1)
    in_line = 0
    assert await slots.take(8, stop, queued=lambda: in_line) == 1  # nothing in line: claim at once
