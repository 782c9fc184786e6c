"""The pure lifecycle module: backoff arithmetic, the retry decision, and the transition table."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qflow._broker.scripts import SCRIPT_NAMES, load_source
from qflow._state import DEFAULT_BACKOFF, TERMINAL, TRANSITIONS, Backoff, State, decide_after_error

# Scripts an operator runs by hand (`qflow jobs retry`): the only ones that may take a job out of a terminal
# state. A worker never undoes a recorded outcome.
OPERATOR_SCRIPTS = frozenset({"retry_failed"})


def test_fixed_backoff_waits_the_same_every_time() -> None:
    """A fixed backoff returns its delay for every attempt."""
    b = Backoff(kind="fixed", delay=2.5)
    assert [b.seconds(n) for n in (1, 2, 10)] == [2.5, 2.5, 2.5]


def test_exponential_backoff_doubles_and_is_capped() -> None:
    """An exponential backoff doubles per attempt up to max_delay."""
    b = Backoff(kind="exponential", delay=1.0, max_delay=10.0)
    assert [b.seconds(n) for n in (1, 2, 3, 4, 5, 100)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@given(
    delay=st.floats(0, 100),
    jitter=st.floats(0, 1),
    attempt=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_jitter_only_shortens_the_wait(delay: float, jitter: float, attempt: int, seed: int) -> None:
    """Jitter draws the wait from [(1 - jitter) * base, base], never above the cap."""
    b = Backoff(kind="exponential", delay=delay, max_delay=1000.0, jitter=jitter)
    base = Backoff(kind="exponential", delay=delay, max_delay=1000.0).seconds(attempt)
    got = b.seconds(attempt, random.Random(seed))
    assert (1 - jitter) * base - 1e-9 <= got <= base + 1e-9


@pytest.mark.parametrize("bad", [{"delay": -1}, {"max_delay": -1}, {"jitter": 1.5}, {"jitter": -0.1}])
def test_invalid_backoff_is_refused(bad: dict[str, float]) -> None:
    """Negative delays and jitter outside 0..1 raise ValueError at construction."""
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**bad)  # type: ignore[arg-type]


def test_decision_retries_until_the_last_attempt() -> None:
    """With 3 attempts, failures 1 and 2 retry, failure 3 is final."""
    decisions = [
        decide_after_error(attempts_spent=n, max_attempts=3, backoff=None, requested_delay=None)
        for n in range(3)
    ]
    assert [d.retry for d in decisions] == [True, True, False]


def test_no_backoff_means_the_default_exponential_backoff_with_jitter() -> None:
    """Without a backoff, retries wait about 1 s, then 2 s, 4 s (shortened by up to a quarter), never 0."""
    rng = random.Random(7)
    decisions = [
        decide_after_error(attempts_spent=n, max_attempts=5, backoff=None, requested_delay=None, rng=rng)
        for n in range(3)
    ]
    delays = [d.delay for d in decisions]
    for delay, base in zip(delays, [1.0, 2.0, 4.0], strict=True):
        assert 0.75 * base <= delay <= base
    assert DEFAULT_BACKOFF.max_delay == 3600.0


def test_requested_delay_wins_over_backoff() -> None:
    """``Retry(delay=...)`` from the handler overrides the backoff policy."""
    d = decide_after_error(attempts_spent=0, max_attempts=5, backoff=Backoff(delay=100), requested_delay=0.5)
    assert (d.retry, d.delay) == (True, 0.5)


def test_backoff_uses_the_attempt_number() -> None:
    """The second failure of an exponential policy waits twice the base delay."""
    d = decide_after_error(attempts_spent=1, max_attempts=5, backoff=Backoff(delay=3), requested_delay=None)
    assert d.delay == 6.0


def test_transition_table_is_closed_over_states() -> None:
    """Every transition starts from a known state (or creation); only an operator leaves a terminal one."""
    for src, dst, script, why in TRANSITIONS:
        assert src is None or isinstance(src, State)
        assert isinstance(dst, State)
        assert script
        assert why
        assert src not in TERMINAL or script in OPERATOR_SCRIPTS, (src, dst, script)
    assert {dst for _, dst, _, _ in TRANSITIONS} == set(State)


def test_every_transition_names_a_script_qflow_loads() -> None:
    """Each row's script is one of qflow's Lua scripts (``lua/<script>.lua``)."""
    for _, _, script, _ in TRANSITIONS:
        assert script in SCRIPT_NAMES
        assert load_source(script)


def states_written(source: str) -> set[str]:
    """The states a Lua script's text stores in the state hash (the key its header names ``state``).

    Two forms are read: ``redis.call('HSET', KEYS[n], id, 'waiting')``, and ``call_batched('HSET', KEYS[n],
    states)`` after ``states[#states + 1] = 'waiting'``. Any other HSET of that key fails the test, so a new
    way of writing a state cannot slip past it.
    """
    header = re.findall(r"KEYS\[(\d+)\] state\b", source)
    if not header:
        return set()
    key = re.escape(f"KEYS[{header[0]}]")
    direct = re.findall(rf"redis\.call\('HSET', {key}, \w+, '(\w+)'\)", source)
    lists = re.findall(rf"call_batched\('HSET', {key}, (\w+)\)", source)
    assert len(re.findall(rf"'HSET', {key}", source)) == len(direct) + len(lists), "an HSET form not read"
    found = set(direct)
    for name in lists:
        found |= set(re.findall(rf"\b{name}\[#{name} \+ 1\] = '(\w+)'", source))
    return found


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_the_states_a_script_writes_are_the_targets_of_its_rows(script: str) -> None:
    """Read from its Lua text, each script stores exactly the states its TRANSITIONS rows lead to."""
    targets = {dst.value for _, dst, name, _ in TRANSITIONS if name == script}
    written = states_written(load_source(script))
    assert written == targets, f"{script}.lua stores {sorted(written)}; its rows lead to {sorted(targets)}"
