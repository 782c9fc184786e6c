"""Seeded chaos soak (issue #5, slow): a steady producer, ``qflow worker -p 2`` behind the fault proxy, and
one fault after another: worker SIGKILLs, proxy cuts (resets and blackholes), a Redis pause and a Redis
restart (SIGKILL, AOF on). Then the faults stop, the queue drains, and the checker runs. One JSON summary.

The jobs are of every kind a user runs (``soak_app``): mostly 0.1 s ``work`` jobs, and delayed ones, ones
that raise before they succeed (retried with a backoff), ones that always raise (failed after their
attempts), plain ``def`` handlers run in threads, and now and then a poison job that SIGKILLs its worker on
every delivery. Retention keeps 50 finished jobs of each kind, so trimming runs all along; a ``Finished``
watcher vouches for the jobs it deletes.

CI mode runs ~75 s of chaos (under ~2 minutes in all); ``QFLOW_SOAK_SECONDS=1800`` makes a long run for
manual use. The seed is printed first (and is in the summary and in every failure message):
``QFLOW_SOAK_SEED=<seed>`` replays the same sequence of faults, holds and pauses, and of job kinds (the
timing of a run on a loaded machine is not replayable).

Every healthy job (all but the poison and the always-failing ones) ends completed; the always-failing ones
fail with their handler's error after their attempts, the poison as stalled after max_stalls + 1 deliveries.
Duplicates are allowed only for jobs in flight at a fault: each job run twice for one attempt must have had
its first run overlap a fault's window (from half a second before it starts to ``LINGER`` after its end), on
the faulted worker if the fault hit one (a kill, a poison's delivery), and their number stays within the sum
over faults of the capacity the fault could hit (one child's slots for a worker kill or a poison, every slot
for a network or server fault). No delayed job runs before its delay.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import qflow
from tests.faults import soak_app
from tests.faults.conftest import TARGET, FaultFleet, Running, assert_clean, settle
from tests.faults.harness import (
    LINGER,
    PROFILE,
    SOCKET_TIMEOUT,
    FaultWindow,
    Figures,
    Finished,
    Proxy,
    Snapshot,
    Spec,
    ValkeyServer,
    check,
    deaths,
    elapsed,
    in_flight,
    poll,
    progressed,
)
from tests.process import ledger_app
from tests.process.ledger_app import Work

SECONDS = float(os.environ.get("QFLOW_SOAK_SECONDS", "75"))
SEED = int(os.environ.get("QFLOW_SOAK_SEED", str(int(time.time()) % 100_000)))
CONCURRENCY = 8
RATE = 40.0
KEEP = 50
"""Finished jobs kept of each kind: ~3,000 complete and ~90 fail in a CI run, so both sets are trimmed."""
ATTEMPTS = 3
"""The most attempts a job gets (``flaky``: up to 2 failures, then success)."""
POISON_EVERY = 30.0
"""Seconds of soak per poison job (at least one): each kills max_stalls + 1 workers."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SECONDS + 180)]


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0
    bound: int = 0
    recovery_s: float | None = None
    detail: str = ""
    pid: int | None = None


class Mix:
    """The kind of each job the soak adds, drawn from its own seeded stream; a poison job now and then."""

    def __init__(self, seed: int, began: float) -> None:
        self.rng = random.Random(seed)
        n = max(1, int(SECONDS // POISON_EVERY))
        self.poison_at = [began + SECONDS * (i + 1) / (n + 1) for i in range(n)]

    def __call__(self) -> Spec:
        if self.poison_at and time.monotonic() >= self.poison_at[0]:
            self.poison_at.pop(0)
            return Spec(soak_app.DIE, Work(seconds=0))
        r = self.rng.random()
        if r < 0.70:
            return Spec(ledger_app.PROCESSOR, Work(seconds=0.1))
        if r < 0.78:
            delay = round(self.rng.uniform(0.2, 3.0), 3)
            return Spec(ledger_app.PROCESSOR, Work(seconds=0.1), {"delay": delay})
        if r < 0.86:
            fails = self.rng.randint(1, ATTEMPTS - 1)
            backoff = qflow.Backoff(kind="fixed", delay=0.2)
            return Spec(soak_app.FLAKY, soak_app.Flaky(fails), {"attempts": fails + 1, "backoff": backoff})
        if r < 0.97:
            return Spec(soak_app.SYNC, Work(seconds=0.05))
        backoff = qflow.Backoff(kind="fixed", delay=0.1)
        return Spec(soak_app.DOOMED, Work(seconds=0), {"attempts": 2, "backoff": backoff})


async def test_seeded_chaos_soak_loses_nothing(
    server: ValkeyServer, proxy: Proxy, fault_prefix: str, tmp_path: Path
) -> None:
    """Chaos under a steady load of every kind of job: every healthy job completed, none lost, duplicates only
    for jobs in flight at a fault and within the bound, every fault recovered from within seconds."""
    print(f"soak seed {SEED} (replay: QFLOW_SOAK_SEED={SEED})", flush=True)
    seed = f"seed {SEED} (replay with QFLOW_SOAK_SEED={SEED})"
    rng = random.Random(SEED)
    fleet = FaultFleet(proxy.url, fault_prefix, tmp_path, **{ledger_app.ENV_KEEP: str(KEEP)})
    app, queue = ledger_app.build_app(
        proxy.url, fault_prefix, settings=PROFILE, socket_timeout=SOCKET_TIMEOUT, keep=KEEP
    )
    soak_app.declare(queue, None)
    direct = server.client()
    faults: list[Fault] = []
    try:
        sup = fleet.start("-p", "2", "-c", str(CONCURRENCY), "-q", ledger_app.QUEUE, target=TARGET)
        await sup.wait_ready(2, timeout=30)
        # -c is per processor: a child runs up to CONCURRENCY jobs of each at once.
        per_child = CONCURRENCY * len(queue.processors)
        t_begin = time.monotonic()
        with Finished(server, queue.keys, keep=KEEP) as fin, Running(queue, rate=RATE, seconds=0.1) as run:
            run.load.make = Mix(SEED * 2 + 1, t_begin)
            # A Redis pause and a restart once each, at random points; the rest drawn at random.
            plan = ["kill_worker", "reset", "blackhole", "kill_worker", "reset", "kill_worker", "blackhole"]
            plan += ["pause_redis", "restart_redis"]
            rng.shuffle(plan)
            i = 0
            while time.monotonic() - t_begin < SECONDS:
                kind = plan[i] if i < len(plan) else rng.choice(["kill_worker", "reset", "blackhole"])
                i += 1
                f = await inject(kind, rng, sup, fleet, server, proxy, per_child)
                faults.append(f)
                # Recovery: the queue makes progress again (ten more completions).
                t_heal = f.end
                when = await poll(
                    progressed(direct, queue.keys, 10),
                    timeout=30,
                    what=f"progress after {kind} ({seed})",
                    interval=0.05,
                )
                f.recovery_s = when - t_heal
                pause = rng.uniform(2.0, 5.0)
                await poll(elapsed(time.monotonic(), pause), timeout=pause + 1, what="quiet time")
            acked = await run.stop()
            snap, _ = await settle(
                direct, queue, acked, timeout=90, details=lambda: sup.log()[-4000:], finished=fin
            )
        led = fleet.read()
        specs = run.load.specs
        kind_of = {j: specs[j].name for j in acked}
        poison = [j for j in acked if kind_of[j] == soak_app.DIE]
        doomed = [j for j in acked if kind_of[j] == soak_app.DOOMED]
        windows = [FaultWindow(f.kind, f.start, f.end, f.pid) for f in faults] + deaths(led, poison)
        hit = in_flight(led, windows, run.load.tried_at)
        c = check(
            snap,
            acked,
            max_attempts=ATTEMPTS,
            unhealthy=poison + doomed,
            in_flight=hit,
            finished=fin,
            keep=KEEP,
        )
        outcome = {j: (snap.state.get(j) or fin.outcome.get(j), _kind(snap, fin, j)) for j in acked}
        # Runs of one attempt of one job (a retry is a new attempt, not a duplicate).
        runs: dict[tuple[str, int | None], list[ledger_app.Entry]] = {}
        ends: dict[tuple[str, int | None, int], float] = {}
        for e in led.entries:
            if e.job is None:
                continue
            if e.event == "start":
                runs.setdefault((e.job, e.attempt), []).append(e)
            elif e.event == "end":
                ends.setdefault((e.job, e.attempt, e.pid), e.t)
        poisoned = set(poison)
        dups = [key for key, starts in runs.items() if len(starts) > 1 and key[0] not in poisoned]
        unexplained = []
        for key in dups:
            first = runs[key][0]
            first_end = ends.get((*key, first.pid), float("inf"))
            if not any(
                first.t <= w.end + LINGER and first_end >= w.start - 0.5 and w.pid in (None, first.pid)
                for w in windows
            ):
                unexplained.append(key)
        early = []
        for j in acked:
            delay = specs[j].options.get("delay")
            first_run = runs.get((j, 1))
            if delay is not None and first_run and first_run[0].t < run.load.tried_at[j] + delay - 0.05:
                early.append(j)
        dup_bound = sum(f.bound for f in faults) + len(deaths(led, poison)) * per_child
        by_kind = Counter(f.kind for f in faults)
        rec: dict[str, float] = {}
        for f in faults:
            if f.recovery_s is not None:
                rec[f.kind] = round(max(rec.get(f.kind, 0.0), f.recovery_s), 3)
        restarts = sup.log().count("killed by SIGKILL")
        run_s = time.monotonic() - t_begin
        Figures(
            "soak",
            seed=SEED,
            seconds=round(run_s, 1),
            jobs=len(acked),
            job_kinds=dict(Counter(kind_of.values())),
            delayed=sum("delay" in specs[j].options for j in acked),
            lost=c.lost,
            healthy_failed=c.healthy_failed,
            dup=len(dups),
            dup_bound=dup_bound,
            dup_unexplained=len(unexplained),
            completed_twice=c.completed_twice,
            trimmed=c.trimmed,
            completed_max=c.completed_max,
            failed_max=c.failed_max,
            keep=KEEP,
            watcher_behind=fin.behind,
            poison=[f"{outcome[j][0]}:{outcome[j][1]}" for j in poison],
            doomed=dict(Counter(f"{s}:{k}" for s, k in (outcome[j] for j in doomed))),
            delayed_early=len(early),
            faults=dict(by_kind),
            recovery_s_max=rec,
            stalled=snap.stats.get("stalled", 0),
            stale_acks=snap.stats.get("stale_acks", 0),
            producer_failures=run.load.failures,
            worker_restarts=restarts,
            jobs_per_s=round(len(acked) / run_s, 1),
            violations=c.violations[:5],
        ).emit()

        assert poison, f"a poison job was added ({seed})"
        assert_clean(c)
        assert all(outcome[j] == ("failed", "stalled") for j in poison), f"poison: {seed}"
        assert all(outcome[j] == ("failed", "error") for j in doomed), f"always-failing jobs: {seed}"
        assert len(dups) <= dup_bound, seed
        assert unexplained == [], f"jobs run twice with no fault in flight: {unexplained[:10]} ({seed})"
        assert early == [], f"delayed jobs ran before their delay: {early[:10]} ({seed})"
        assert all(f.recovery_s is not None and f.recovery_s < 15 for f in faults), seed
        assert sup.popen.poll() is None, f"the supervisor is still running ({seed})"
    finally:
        direct.close()
        await app.close()
        if server.paused:
            server.resume()
        fleet.cleanup()


def _kind(snap: Snapshot, fin: Finished, job_id: str) -> str | None:
    """A failed job's failure kind, from Redis or, once trimmed, from what the watcher saw."""
    if job_id in snap.state:
        return snap.failure_kind(job_id)
    return fin.kinds.get(job_id)


async def inject(
    kind: str,
    rng: random.Random,
    sup: object,
    fleet: FaultFleet,
    server: ValkeyServer,
    proxy: Proxy,
    per_child: int,
) -> Fault:
    """Inject one fault, hold it, heal it; return its window and its duplicate bound (what the jobs in flight
    on one child, or on both, can be at most)."""
    capacity = 2 * per_child
    from tests.process.fleet_app import Supervised

    assert isinstance(sup, Supervised)
    now = time.monotonic
    if kind == "kill_worker":
        pids = sorted(sup.ready_pids())
        assert pids, "no ready child to kill"
        victim = rng.choice(pids)
        f = Fault(kind, now(), bound=per_child, detail=str(victim), pid=victim)
        os.kill(victim, signal.SIGKILL)
        await poll(lambda: victim not in sup.child_pids(), timeout=10, what="the victim reaped")
        await sup.wait_ready(2, timeout=30)
        f.end = now()
        return f
    if kind == "reset":
        f = Fault(kind, now(), bound=capacity)
        f.detail = str(proxy.reset_all())
        f.end = now()
        return f
    if kind == "blackhole":
        hold = rng.uniform(0.5, 3.0)
        f = Fault(kind, proxy.set_mode("blackhole"), bound=capacity, detail=f"{hold:.2f}s")
        await poll(lambda: now() - f.start >= hold, timeout=hold + 1, what="the blackhole")
        f.end = proxy.set_mode(
            "pass"
        )  # the silenced connections are left for their clients' timeouts to find
        return f
    if kind == "pause_redis":
        hold = rng.uniform(1.5, 3.0)
        f = Fault(kind, server.pause(), bound=capacity, detail=f"{hold:.2f}s")
        await poll(lambda: now() - f.start >= hold, timeout=hold + 1, what="the pause")
        f.end = server.resume()
        return f
    if kind == "restart_redis":
        f = Fault(kind, server.kill(), bound=capacity)
        hold = rng.uniform(0.5, 2.0)
        await poll(lambda: now() - f.start >= hold, timeout=hold + 1, what="the outage")
        f.end = server.restart()
        f.detail = f"{hold:.2f}s down"
        return f
    raise ValueError(kind)
