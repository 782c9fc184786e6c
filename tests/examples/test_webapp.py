"""examples/webapp: the API answers 202 at once and a separate worker sends the mail; measure.py runs."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.examples.conftest import REPO_ROOT, clean_env, needs_cli, run

pytest.importorskip("starlette", reason="needs the examples extra: pip install -e '.[examples]'")
pytest.importorskip("uvicorn", reason="needs the examples extra: pip install -e '.[examples]'")


@pytest.fixture
def webapp_server(redis_url: str) -> Iterator[str]:
    """The test server; the web app's queues (``qflow:{webapp-*}``) are deleted afterwards."""
    yield redis_url
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        keys = list(client.scan_iter(match="qflow:{webapp-*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(method: str, url: str, body: object = None) -> tuple[int, dict[str, object]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def poll(
    predicate: Callable[[], bool], *, timeout: float, what: str, procs: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args!r} exited with {p.returncode} while waiting for {what}")
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@needs_cli
def test_api_answers_202_and_a_separate_worker_sends_the_welcome(webapp_server: str, tmp_path: Path) -> None:
    """The two roles from one module: uvicorn serves and enqueues; `qflow worker` runs the job."""
    env = clean_env(QFLOW_REDIS_URL=webapp_server, PYTHONPATH=str(REPO_ROOT))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for args in (
            ["-m", "uvicorn", "examples.webapp.app:api", "--port", str(port), "--log-level", "warning"],
            ["-m", "qflow", "worker", "examples.webapp.app:app", "-p", "1", "--log-level", "WARNING"],
        ):
            log = (tmp_path / f"{len(procs)}.log").open("wb")
            procs.append(
                subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=log, stderr=log)
            )
            log.close()
        poll(lambda: call("GET", f"{base}/health")[0] == 200, timeout=20, what="the API", procs=procs)

        status, body = call("POST", f"{base}/users", {"email": "ada@example.com", "name": "Ada"})
        assert status == 202, body
        assert call("POST", f"{base}/users", {"email": "no name"})[0] == 422

        def sent() -> bool:
            state, job = call("GET", f"{base}{body['status']}")
            return state == 200 and job.get("state") == "completed"

        poll(sent, timeout=20, what="the welcome job to complete", procs=procs)
        assert call("GET", f"{base}{body['status']}")[1]["result"] == "welcome mail sent to ada@example.com"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@needs_cli
def test_measure_prints_a_latency_table_for_each_scenario(webapp_server: str) -> None:
    """A tiny run of measure.py (both kinds of scenario) prints one table row per scenario."""
    tiny = ["--rounds", "1", "--requests", "15", "--heavy-ms", "5", "--rate", "200"]
    tiny += ["--scenarios", "in-api-async,separate"]
    done = run(
        ["-m", "examples.webapp.measure", *tiny],
        env=clean_env(QFLOW_REDIS_URL=webapp_server),
        timeout=90,
    )
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| in ", line)]
    assert len(rows) == 2, done.stdout
    assert all(re.search(r"\| 15 \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+/s \|$", r) for r in rows), (
        rows
    )
