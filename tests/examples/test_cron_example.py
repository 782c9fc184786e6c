"""examples/patterns/cron.py runs to its end against the test server: one job per tick with two workers."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

from tests.examples.conftest import clean_env, run


@pytest.fixture
def cron_server(redis_url: str) -> Iterator[str]:
    """The test server; the example's queue (``qflow:{patterns-cron}``) is deleted afterwards."""
    yield redis_url
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match="qflow:{patterns-cron}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_the_cron_example_runs_each_tick_once_with_two_workers(cron_server: str) -> None:
    """Both schedules fire, every job runs exactly once, and the listing shows their specs."""
    out = run(["-m", "examples.patterns.cron"], env=clean_env(QFLOW_REDIS_URL=cron_server)).stdout
    assert "heartbeat: cron */2 * * * * *" in out
    assert "sweep-every-second: every 1s" in out
    assert re.search(r"sched:heartbeat:\d+: every two seconds", out)
    assert re.search(r"sched:sweep-every-second:\d+: sweep \{'older_than_days': 30\}", out)
    assert "each run {1} time(s)" in out
