"""A delivery's states and their legal moves (``qflow._worker.deliveries``): the table, move and cancel."""

from __future__ import annotations

import asyncio
import re

import pytest

import qflow
from qflow._broker.scripts import Claimed
from qflow._worker import deliveries
from qflow._worker.deliveries import (
    CANCELLABLE,
    MOVES,
    TERMINAL,
    CancelReason,
    Delivery,
    DeliveryState,
    IllegalMove,
    QueueRunner,
)

S = DeliveryState


def delivery(job_id: bytes = b"job-1", state: DeliveryState = S.CLAIMED) -> Delivery:
    """A delivery of a claimed job, put in ``state`` directly (the table is tested on its own)."""
    d = Delivery(Claimed(id=job_id, token=b"7", envelope=b"", attempts=0, stalls=0))
    d.state = state
    return d


def reachable(start: DeliveryState) -> set[DeliveryState]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in MOVES[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_table_has_a_row_for_every_state_and_no_move_to_itself() -> None:
    """Every state has a row; every move leads to another state."""
    assert set(MOVES) == set(S)
    for state, exits in MOVES.items():
        assert exits <= set(S)
        assert state not in exits


def test_every_state_is_reachable_from_claimed() -> None:
    """A claim is where every delivery begins, and each state can happen."""
    assert reachable(S.CLAIMED) == set(S)


def test_final_states_have_no_exits_and_every_other_state_reaches_one() -> None:
    """Released and done are final; no delivery can be stuck in a state with no way out."""
    assert {S.RELEASED, S.DONE} == TERMINAL
    for state in TERMINAL:
        assert MOVES[state] == frozenset()
    for state in set(S) - TERMINAL:
        assert reachable(state) & TERMINAL, state


def test_a_completed_job_goes_claimed_running_acking_done() -> None:
    """The hot path is three legal moves."""
    d = delivery()
    for state in (S.RUNNING, S.ACKING, S.DONE):
        d.move(state)
        assert d.state is state


@pytest.mark.parametrize("start", list(S))
def test_every_move_in_the_table_is_made_and_every_other_raises(start: DeliveryState) -> None:
    """``move`` makes exactly the table's moves; any other raises IllegalMove and leaves the state."""
    for to in S:
        d = delivery(state=start)
        if to in MOVES[start]:
            d.move(to)
            assert d.state is to
        else:
            with pytest.raises(IllegalMove, match=f"{start.value} -> {to.value}"):
                d.move(to)
            assert d.state is start


def test_the_module_docstring_lists_exactly_the_table() -> None:
    """The move list a reader sees in ``deliveries``' docstring is the table the code follows."""
    doc = deliveries.__doc__
    assert doc is not None
    listed = {
        S(src): frozenset(S(t.strip()) for t in targets.split(","))
        for src, targets in re.findall(r"^\s+(\w+)\s+->\s+(.+)$", doc, re.MULTILINE)
    }
    assert listed == {state: exits for state, exits in MOVES.items() if exits}


@pytest.mark.parametrize("start", [s for s in S if s in CANCELLABLE])
@pytest.mark.parametrize("reason", list(CancelReason))
def test_each_cancel_reason_leads_to_its_own_state(start: DeliveryState, reason: CancelReason) -> None:
    """Lost leads to LOST, release to RELEASING, from every state a cancel applies to."""
    d = delivery(state=start)
    assert d.cancel(reason)
    assert d.state is {CancelReason.LOST: S.LOST, CancelReason.RELEASE: S.RELEASING}[reason]


@pytest.mark.parametrize("start", [S.ACKING, S.RELEASED, S.DONE])
def test_cancel_leaves_an_acking_or_final_delivery_alone(start: DeliveryState) -> None:
    """An outcome on its way (the ack took the token) or a settled delivery is not the worker's to cancel."""
    d = delivery(state=start)
    assert not d.cancel(CancelReason.LOST)
    assert not d.cancel(CancelReason.RELEASE)
    assert d.state is start


async def test_a_second_cancel_keeps_the_first_reason_and_cancels_the_handler_again() -> None:
    """A job lost while being released stays lost; its handler is cancelled each time (it may swallow one)."""
    d = delivery()
    d.move(S.RUNNING)
    d.task = asyncio.create_task(asyncio.sleep(10))
    assert d.cancel(CancelReason.LOST)
    assert d.cancel(CancelReason.RELEASE)
    assert d.state is S.LOST
    assert d.task.cancelling() == 2
    with pytest.raises(asyncio.CancelledError):
        await d.task


def test_finish_forgets_a_done_delivery_and_keeps_a_releasing_one_for_the_drain() -> None:
    """Done deliveries leave ``in_flight``; released ones stay until the drain hands them back."""
    r = QueueRunner(qflow.App("redis://127.0.0.1:1/0").queue("q"), None, 0.0)
    done, kept = delivery(b"a", S.RUNNING), delivery(b"b", S.RELEASING)
    r.in_flight = {done.id: done, kept.id: kept}
    r.finish(done)
    r.finish(kept)
    assert done.state is S.DONE
    assert kept.state is S.RELEASING
    assert r.in_flight == {"b": kept}
    assert not done.holds_slot
    assert not kept.holds_slot


def test_finish_leaves_a_newer_delivery_of_the_same_job_in_flight() -> None:
    """A job claimed again while its lost delivery unwinds here keeps the newer delivery's entry."""
    r = QueueRunner(qflow.App("redis://127.0.0.1:1/0").queue("q"), None, 0.0)
    old, new = delivery(state=S.LOST), delivery()
    r.in_flight = {new.id: new}
    r.finish(old)
    assert old.state is S.DONE
    assert r.in_flight == {new.id: new}
