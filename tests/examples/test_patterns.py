"""Each integration pattern in examples/patterns/ runs to its end against the test server and says so."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import redis

from tests.examples.conftest import clean_env, run

PATTERNS = {
    "lifespan": [
        "GET before any worker ran -> 202 {'state': 'waiting'}",
        "GET after the worker ran -> 200 {'thumbnail': 'cat.jpg.thumb.jpg'}",
        "lifespan: connection pool closed",
    ],
    "wait_result": [
        "not finished yet",
        "waiting longer: 120.0",
        "by id, from a fresh handle: 120.0",
        "failed: ValueError: amount must be positive",
        "unknown id: JobNotFound",
    ],
    "sync_cpu": ["primes: 4 jobs", "primes_on_the_loop: 4 jobs", "{4203} primes each"],
    "retries": [
        "deliver_webhook attempt 3",
        "webhook: delivered on attempt 3",
        "rate-limited call: answered after waiting as asked",
        "always_broken: failed for good: RuntimeError: this one never works",
    ],
    "delayed": ["'abandoned cart, first nudge': 'delayed'", "'order confirmation': ran"],
    "typed": [
        # then msgspec's words (its wording changes between releases; tests/integration/test_bad_input.py
        # checks the field named and the cause's class)
        "refused: payload does not match Order: ",
        "order 1042: 48.99 total",
        "order 1043: 39.00 total",
    ],
}
NEEDS_WEB = {"lifespan": ("starlette", "uvicorn", "httpx")}


@pytest.fixture
def patterns_server(redis_url: str) -> Iterator[str]:
    """The test server; the patterns' queues (``qflow:{patterns-*}``) are deleted afterwards."""
    yield redis_url
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match="qflow:{patterns-*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_runs_and_prints_what_it_demonstrates(name: str, patterns_server: str) -> None:
    """``python -m examples.patterns.NAME`` exits 0 and prints the lines that show its point."""
    for module in NEEDS_WEB.get(name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the examples extra: pip install -e '.[examples]' ({module} missing)")
    done = run(["-m", f"examples.patterns.{name}"], env=clean_env(QFLOW_REDIS_URL=patterns_server))
    for line in PATTERNS[name]:
        assert line in done.stdout, f"{line!r} not in:\n{done.stdout}"
    if name == "sync_cpu":  # its point, checked: a `def` processor pauses the event loop less
        pauses = {
            line.split(":")[0].strip(): float(line.rsplit("pause", 1)[1].split("ms")[0])
            for line in done.stdout.splitlines()
            if "longest loop pause" in line
        }
        assert pauses["primes"] < pauses["primes_on_the_loop"], done.stdout
