"""Throttle and debounce with two producer processes racing on one dedup key (issue 14 acceptance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import qflow
from qflow.testing import drain
from tests.process.conftest import REPO_ROOT, until
from tests.process.dedup_producer import QUEUE

N = 200


def _spawn(redis_url: str, prefix: str, mode: str, tag: str, go: Path) -> subprocess.Popen[bytes]:
    """One producer process (it waits for ``go`` before adding)."""
    argv = [
        sys.executable,
        "-m",
        "tests.process.dedup_producer",
        redis_url,
        prefix,
        mode,
        str(N),
        tag,
        str(go),
    ]
    return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def _race(redis_url: str, prefix: str, tmp_path: Path, mode: str) -> list[dict[str, str]]:
    """Start two producers, let them go at once, wait for both; every add's outcome, in no set order."""
    go = tmp_path / "go"
    procs = [_spawn(redis_url, prefix, mode, tag, go) for tag in ("a", "b")]
    try:
        go.touch()
        await until(lambda: all(p.poll() is not None for p in procs), timeout=60, what="both producers")
        lines = []
        for p in procs:
            out, err = p.communicate()
            assert p.returncode == 0, err.decode()
            lines += [json.loads(line) for line in out.decode().splitlines()]
        return lines
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("mode", ["throttle", "debounce"])
async def test_two_producer_processes_racing_on_one_key_make_one_job(
    redis_url: str, prefix: str, tmp_path: Path, mode: str
) -> None:
    """2 x 200 racing adds with one key: one job created, 399 throttled/debounced naming it; it runs once,
    with the first payload (throttle) or the last payload of one of the producers (debounce)."""
    adds = await _race(redis_url, prefix, tmp_path, mode)
    assert len(adds) == 2 * N
    outcomes = [a["outcome"] for a in adds]
    other = "throttled" if mode == "throttle" else "debounced"
    assert outcomes.count("created") == 1
    assert outcomes.count(other) == 2 * N - 1
    (job_id,) = {a["id"] for a in adds}
    app = qflow.App(redis_url, prefix=prefix, worker=qflow.testing.FAST)
    try:
        q = app.queue(QUEUE)
        ran: list[str] = []

        @q.processor
        async def work(job: qflow.Job[str]) -> None:
            ran.append(job.payload)

        assert await app.redis().hlen(q.keys.jobs) == 1
        info = await q.get_job(job_id)
        if mode == "throttle":
            assert info.payload in ("a-0", "b-0")
        else:
            assert info.payload in (f"a-{N - 1}", f"b-{N - 1}")
            # Debounced adds pushed the job 60 s out; make it due now with one more add and no delay.
            last = await q.add("work", "final", dedup=qflow.Dedup("race", ttl=60, mode="debounce"))
            assert (last.outcome, last.id) == (qflow.AddOutcome.DEBOUNCED, job_id)
        await drain(app, [q])
        assert ran == ([info.payload] if mode == "throttle" else ["final"])
    finally:
        await app.close()
