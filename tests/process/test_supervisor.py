"""``qflow worker -p N``: the supervisor, with real subprocesses and real signals (issue #3).

Every test starts ``python -m qflow worker tests.process.fleet_app:app`` in its own session, synchronises by
polling (the supervisor's control socket, the ledger, the queue) with a deadline, and kills and reaps the
whole process group in teardown.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import qflow
from tests.process import fleet_app
from tests.process.fleet_app import Fleet, alive

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTTIN"), reason="POSIX signals")


@pytest.fixture
async def queue(redis_url: str, prefix: str) -> AsyncIterator[qflow.Queue]:
    """The producer side of ``fleet_app``'s ``work`` queue."""
    app = fleet_app.build(redis_url, prefix)
    yield app.queues[fleet_app.QUEUE]
    await app.close()


async def add(queue: qflow.Queue, name: str, payload: object, n: int) -> list[str]:
    """Add ``n`` jobs; return their ids."""
    jobs = await queue.add_bulk(qflow.JobSpec(name, payload) for _ in range(n))
    return [j.id for j in jobs]


async def wait_counts(fleet: Fleet, queue: qflow.Queue, timeout: float = 20.0, **want: int) -> dict[str, int]:
    """Poll ``queue.counts()`` until it has the wanted values."""
    deadline = time.monotonic() + timeout
    while True:
        counts = await queue.counts()
        if all(counts[k] == v for k, v in want.items()):
            return counts
        if time.monotonic() > deadline:
            logs = "\n".join(s.log() for s in fleet.supervisors)
            raise AssertionError(f"counts {counts}, wanted {want}\n{logs}")
        await asyncio.sleep(0.02)  # poll interval, not synchronisation: the loop checks the condition


async def test_sigkill_of_a_child_mid_job_is_replaced_within_a_second_and_no_job_is_lost(
    fleet: Fleet, queue: qflow.Queue
) -> None:
    """A SIGKILLed child is reaped ("killed by SIGKILL") and replaced at once; its jobs complete elsewhere."""
    sup = fleet.start("-p", "2", "-c", "3")
    pids = await sup.wait_ready(2)
    ids = await add(queue, "sleep", 0.3, 30)
    victim = min(pids)
    await fleet.until(
        lambda: any(victim in fleet.ledger().starts.get(i, []) for i in ids),
        timeout=10,
        what="a job on victim",
    )
    led = fleet.ledger()
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    in_flight = [i for i in ids if victim in led.starts.get(i, []) and victim not in led.ends.get(i, [])]
    spawned = await fleet.until(
        lambda: len(sup.child_pids() - pids) == 1, timeout=5, what="a replacement child", sup=sup
    )
    await sup.wait_ready(2)
    await wait_counts(fleet, queue, completed=30, active=0, waiting=0)
    led = fleet.ledger()
    assert spawned - killed_at < 1.0
    assert all(led.ends.get(i) for i in ids), "every job finished"
    assert in_flight, "the victim had jobs in flight"
    assert all(set(led.ends[i]) - {victim} for i in in_flight), "the victim's jobs finished elsewhere"
    assert f"(pid {victim}) killed by SIGKILL" in sup.log()


async def test_sigterm_drains_jobs_in_flight_then_exits_zero(fleet: Fleet, queue: qflow.Queue) -> None:
    """SIGTERM: every child finishes its jobs in flight, nothing is released, the supervisor exits 0."""
    sup = fleet.start("-p", "2", "-c", "2")
    await sup.wait_ready(2)
    ids = await add(queue, "sleep", 1.0, 4)
    await fleet.until(lambda: len(fleet.ledger().starts) == 4, timeout=10, what="4 jobs started")
    sup.send(signal.SIGTERM)
    assert await sup.wait_exit(10) == 0
    led = fleet.ledger()
    assert all(led.ends.get(i) for i in ids)
    counts = await queue.counts()
    assert (counts["completed"], counts["active"], counts["waiting"]) == (4, 0, 0)
    assert (await queue.stats()).get("released", 0) == 0
    assert "SIGTERM: draining 2 worker(s)" in sup.log()


async def test_second_sigterm_stops_within_a_second_and_releases_unfinished_jobs(
    fleet: Fleet, queue: qflow.Queue
) -> None:
    """A second SIGTERM makes every child release its jobs at once; the supervisor exits 0 within ~1 s."""
    sup = fleet.start("-p", "2", "-c", "2")
    pids = await sup.wait_ready(2)
    await add(queue, "sleep", 60.0, 4)
    await wait_counts(fleet, queue, active=4, timeout=10)
    sup.send(signal.SIGTERM)
    await fleet.until(lambda: "draining (up to" in sup.log(), timeout=5, what="children draining", sup=sup)
    sup.send(signal.SIGTERM)
    sent = time.monotonic()
    assert await sup.wait_exit(5) == 0
    assert time.monotonic() - sent < 1.5
    counts = await queue.counts()
    assert (counts["waiting"], counts["active"], counts["completed"]) == (4, 0, 0)
    stats = await queue.stats()
    # >= 4: a job released by one child may be claimed by the other before that one stops fetching.
    assert stats["released"] >= 4
    assert stats.get("retried", 0) == 0, "no attempt spent"
    assert not any(alive(p) for p in pids)


async def test_sigttin_and_sigttou_change_the_count_without_touching_the_others(fleet: Fleet) -> None:
    """SIGTTIN adds one child, SIGTTOU drains the youngest; the original children keep their pids."""
    sup = fleet.start("-p", "2")
    first = await sup.wait_ready(2)
    sup.send(signal.SIGTTIN)
    three = await sup.wait_ready(3)
    assert first < three
    sup.send(signal.SIGTTOU)
    two = await sup.wait_ready(2)
    assert two == first
    assert "SIGTTOU: scaling from 3 to 2" in sup.log()


async def test_scale_command_changes_the_count_from_another_terminal(fleet: Fleet) -> None:
    """``qflow scale module:app N`` and ``qflow scale PID -K`` resize a running supervisor in place."""
    sup = fleet.start("-p", "1")
    (first,) = await sup.wait_ready(1)
    up = fleet.cli("scale", fleet_app.TARGET, "3", "--wait")
    assert up.returncode == 0, up.stderr
    assert "3 process(es) wanted, 3 running" in up.stdout
    assert first in sup.ready_pids()
    down = fleet.cli("scale", str(sup.pid), "-2", "--wait", "--json")
    assert down.returncode == 0, down.stderr
    assert sup.ready_pids() == {first}
    missing = fleet.cli("scale", "tests.process.fleet_app:other", "2")
    assert missing.returncode == 6


async def test_max_jobs_per_child_recycles_children_and_loses_no_job(
    fleet: Fleet, queue: qflow.Queue
) -> None:
    """Children drain and are replaced after about N jobs; every job still completes exactly once."""
    sup = fleet.start("-p", "2", "-c", "2", "--max-jobs-per-child", "5")
    await sup.wait_ready(2)
    ids = await add(queue, "sleep", 0.01, 40)
    await wait_counts(fleet, queue, completed=40, active=0, waiting=0)
    led = fleet.ledger()
    assert sorted(led.ends) == sorted(ids)
    assert all(len(led.ends[i]) == 1 for i in ids), "no job ran twice"
    assert len(led.pids()) >= 3, "children were recycled"
    assert "recycled (exited with code 8 (RECYCLE))" in sup.log()
    assert "crash" not in sup.log()


@pytest.mark.parametrize(
    ("target", "args", "code", "message"),
    [
        ("tests.process.no_such_module:app", (), 3, "no module named 'tests.process.no_such_module'"),
        ("tests.process.fleet_app:missing", (), 3, "'tests.process.fleet_app' has no attribute 'missing'"),
        ("tests.process.fleet_app:SETTINGS", (), 3, "not a qflow.App"),
        (fleet_app.TARGET, ("-q", "nosuch"), 4, "no queue named 'nosuch'"),
    ],
)
async def test_bad_target_exits_with_its_code_and_is_not_restarted(
    fleet: Fleet, target: str, args: tuple[str, ...], code: int, message: str
) -> None:
    """A target that cannot load halts the supervisor with its documented code after one child, one error."""
    sup = fleet.start("-p", "3", *args, target=target)
    assert await sup.wait_exit(15) == code
    log = sup.log()
    assert log.count("started worker-") == 1
    assert log.count(message) == 1


async def test_sigkill_of_the_supervisor_leaves_no_child_running(fleet: Fleet, queue: qflow.Queue) -> None:
    """Children of a SIGKILLed supervisor stop at once (PR_SET_PDEATHSIG, stdin EOF), releasing their jobs."""
    sup = fleet.start("-p", "2", "-c", "2")
    pids = await sup.wait_ready(2)
    await add(queue, "sleep", 60.0, 4)
    await wait_counts(fleet, queue, active=4, timeout=10)
    sup.popen.kill()
    sup.popen.wait()
    await fleet.until(lambda: not any(alive(p) for p in pids), timeout=4, what="children gone")
    counts = await queue.counts()
    assert (counts["waiting"], counts["active"]) == (4, 0), "released, not left to their leases"


async def test_cpu_bound_sync_processor_keeps_its_lease_and_runs_once(
    fleet: Fleet, queue: qflow.Queue
) -> None:
    """Sync CPU-bound jobs longer than the lease run in threads: leases renew, nothing stalls or reruns."""
    sup = fleet.start("-p", "1", "-c", "3")
    await sup.wait_ready(1)
    ids = await add(queue, "cpu", 2.5, 3)
    await wait_counts(fleet, queue, completed=3, active=0, timeout=30)
    led = fleet.ledger()
    assert all(len(led.starts[i]) == 1 for i in ids), "no duplicate run"
    stats = await queue.stats()
    assert stats.get("stalled", 0) == 0
    assert stats.get("stale_acks", 0) == 0
    assert "blocking the event loop" not in sup.log()


async def test_blocked_event_loop_is_named_then_the_child_is_killed_and_replaced(
    fleet: Fleet, queue: qflow.Queue
) -> None:
    """An async processor blocking the loop is named in a warning; the silent child is killed and replaced."""
    sup = fleet.start("-p", "1", "--hang-timeout", "1.5")
    (first,) = await sup.wait_ready(1)
    (job_id,) = await add(queue, "block", 60.0, 1)
    await fleet.until(
        lambda: "async processor work:block" in sup.log(), timeout=5, what="the blocking warning", sup=sup
    )
    await fleet.until(lambda: bool(sup.ready_pids() - {first}), timeout=15, what="a new child", sup=sup)
    await wait_counts(fleet, queue, completed=1, timeout=15)
    log = sup.log()
    assert f"job {job_id}) is blocking the event loop" in log
    assert "make it `def`" in log.lower()
    assert "no heartbeat for" in log
    assert not alive(first)


async def test_sighup_rolls_every_child_one_at_a_time_and_loses_no_job(
    fleet: Fleet, queue: qflow.Queue
) -> None:
    """SIGHUP replaces each child by a new one (old drains once the new is ready); every job completes."""
    sup = fleet.start("-p", "2", "-c", "2")
    old = await sup.wait_ready(2)
    ids = await add(queue, "sleep", 0.05, 120)
    await fleet.until(lambda: len(fleet.ledger().ends) >= 10, timeout=10, what="jobs flowing")
    sup.send(signal.SIGHUP)
    await fleet.until(
        lambda: len(sup.ready_pids() - old) == 2 and not (sup.child_pids() & old), timeout=20, what="rolled"
    )
    await wait_counts(fleet, queue, completed=120, active=0, waiting=0)
    led = fleet.ledger()
    assert all(led.ends.get(i) for i in ids)
    assert "rolling restart done" in sup.log()
    assert (await queue.stats()).get("failed", 0) == 0


async def test_memory_limit_recycles_the_child(fleet: Fleet, queue: qflow.Queue) -> None:
    """A child whose RSS passes --max-memory-per-child drains and is replaced by a fresh one."""
    sup = fleet.start("-p", "1", "--max-memory-per-child", "120")
    (first,) = await sup.wait_ready(1)
    await add(queue, "hog", 100, 1)
    await fleet.until(lambda: sup.ready_pids() - {first}, timeout=15, what="a recycled child", sup=sup)
    await fleet.until(lambda: not alive(first), timeout=10, what="old child gone")
    assert "over --max-memory-per-child 120 MB" in sup.log()
    await wait_counts(fleet, queue, completed=1, active=0, waiting=0, timeout=10)
    assert [len(p) for p in fleet.ledger().starts.values()] == [1], "ran once"


_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"(supervisor|worker-\d+)\[\d+\] [\w.]+: "
)


async def test_uvloop_workers_run_jobs_and_drain_on_sigterm(fleet: Fleet, queue: qflow.Queue) -> None:
    """``--loop uvloop``: the children run on uvloop, finish their jobs on SIGTERM, the supervisor exits 0."""
    sup = fleet.start("-p", "2", "-c", "2", "--loop", "uvloop")
    await sup.wait_ready(2)
    ids = await add(queue, "sleep", 0.5, 4)
    await fleet.until(lambda: len(fleet.ledger().starts) == 4, timeout=10, what="4 jobs started")
    sup.send(signal.SIGTERM)
    assert await sup.wait_exit(10) == 0
    led = fleet.ledger()
    assert all(led.ends.get(i) for i in ids)
    assert (await queue.counts())["completed"] == 4
    assert sup.log().count("event loop: uvloop") == 2


async def test_burst_drains_then_exits_zero_with_one_log_format(fleet: Fleet, queue: qflow.Queue) -> None:
    """``--burst -p 2`` exits 0 once the queues are empty; every log line has one format with name[pid]."""
    await add(queue, "sleep", 0.01, 20)
    sup = fleet.start("-p", "2", "--burst")
    assert await sup.wait_exit(20) == 0
    assert (await queue.counts())["completed"] == 20
    lines = sup.log().splitlines()
    assert any("supervisor[" in line for line in lines)
    assert any(re.search(r"worker-\d+\[", line) for line in lines)
    assert all(_LINE.match(line) for line in lines), "\n".join(lines)


async def test_sighup_onto_a_broken_deploy_keeps_the_running_children(fleet: Fleet) -> None:
    """If new code cannot load, the rolling restart stops at the first new child; the old ones keep going."""
    broken = fleet.tmp / "broken"
    fleet.env["FLEET_BREAK"] = str(broken)
    sup = fleet.start("-p", "2")
    old = await sup.wait_ready(2)
    broken.touch()
    sup.send(signal.SIGHUP)
    await fleet.until(lambda: "rolling restart aborted" in sup.log(), timeout=15, what="abort", sup=sup)
    assert await sup.wait_ready(2) == old
    assert "this deploy is broken" in sup.log()
    assert sup.popen.poll() is None


def _spawn_script(script: str, fleet: Fleet, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -c script`` in its own session, from the repo root, logging to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=fleet_app.REPO_ROOT,
            env=fleet.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_crash_loop_is_capped_and_reported(fleet: Fleet) -> None:
    """Children that die as soon as they start are replaced with backoff, then the supervisor gives up (7)."""
    crash = fleet.tmp / "crash"
    crash.touch()
    fleet.env["FLEET_CRASH"] = str(crash)
    script = (
        "import sys; from pathlib import Path; from qflow._cli.logs import configure_logging; "
        "from qflow._cli.child import ChildConfig; from qflow._cli.supervisor import Supervisor; "
        "configure_logging('INFO', 'supervisor'); "
        f"sys.exit(Supervisor(ChildConfig(target={fleet_app.TARGET!r}), 2, max_restarts=3).run())"
    )
    log_path = fleet.tmp / "crash.log"
    popen = _spawn_script(script, fleet, log_path)
    try:
        await fleet.until(lambda: popen.poll() is not None, timeout=20, what="the supervisor to give up")
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
    text = log_path.read_text()
    assert popen.returncode == 7, text
    assert "crash loop: 3 workers in a row died" in text
    assert text.count("started worker-") == 3
    assert "replacing it in 0.5s" in text


async def test_unreachable_redis_is_retried_not_a_crash_loop(fleet: Fleet) -> None:
    """Children that cannot reach Redis exit UNAVAILABLE and are retried with backoff; SIGTERM exits 0."""
    fleet.env["FLEET_REDIS_URL"] = "redis://127.0.0.1:1/0"
    sup = fleet.start("-p", "1")
    await fleet.until(
        lambda: sup.log().count("Redis is unreachable; next try in") >= 2, timeout=15, what="retries", sup=sup
    )
    sup.send(signal.SIGTERM)
    assert await sup.wait_exit(10) == 0
    assert "crash loop" not in sup.log()
