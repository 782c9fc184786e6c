"""Cron every second under two supervised fleets, with crashes, a restart and an outage (issue 14 item 2).

Two ``qflow worker tests.process.cron_app:app -p 4`` supervisors stand for two hosts; host B's wall clock
runs two minutes ahead (``tests/faults/skew``: Python's ``time.time`` and ``datetime``, the monotonic clock
untouched). Two schedules tick every second: ``every-second``, declared in the app's code (``run_once``,
upserted by every worker process at its start), and ``skip-late``, upserted from this test process
(``skip`` with a 0.75 s grace). While they tick, one worker process of either host is SIGKILLed every 3 s,
host A is restarted gracefully midway, and later both hosts are SIGKILLed (process groups) and kept down for
3.5 s before they come back. At the end both drain, and the checker reads Redis and the ledger:

- every tick from the first to the cursor got exactly one job, or none if it fell in the outage (the
  server's ``fired`` + ``missed`` counters account for every tick);
- after the outage, ``run_once`` created one job for the ticks it missed; ``skip`` created none for them
  but perhaps the latest, if fired within its grace;
- every job ran once, or again only as the recovery of a run whose process was killed (``stalls`` > 0),
  or still waits (created during the drain);
- host B's clock really was two minutes off.

Rerun: ``python -m pytest tests/process/test_cron_fleet.py -s`` (the figures are one JSON line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from qflow._broker import commands
from tests.process import cron_app
from tests.process.conftest import REPO_ROOT, report
from tests.process.fleet_app import Fleet, Supervised, alive

pytestmark = pytest.mark.timeout(120)

TARGET = "tests.process.cron_app:app"
SKEW = 120.0
SKIP = "skip-late"
KILL_EVERY = 3.0
OUTAGE = 3.5


@dataclass(frozen=True)
class Run:
    """One ledger line: a handler run."""

    job: str
    pid: int
    host: str
    wall: float
    stalls: int

    @property
    def schedule(self) -> str:
        return self.job.split(":")[1]

    @property
    def tick(self) -> int:
        return int(self.job.rsplit(":", 1)[1])


def read_runs(directory: Path) -> list[Run]:
    runs = []
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            job, pid, host, wall, stalls = line.split()
            runs.append(Run(job, int(pid), host, float(wall), int(stalls)))
    return runs


class Hosts:
    """Starts, kills and restarts the two pretend hosts; SIGKILLs a random worker process now and then."""

    def __init__(self, fleet: Fleet, rng: random.Random) -> None:
        self.fleet = fleet
        self.rng = rng
        self.base_env = dict(fleet.env)
        self.sups: dict[str, Supervised] = {}
        self.kills = 0
        self.next_kill = time.monotonic() + KILL_EVERY

    def start(self, host: str) -> Supervised:
        env = {**self.base_env, "CRON_HOST": host}
        if host == "B":
            skew_dir = str(REPO_ROOT / "tests" / "faults" / "skew")
            env.update(QFLOW_FAULTS_SKEW=str(SKEW), PYTHONPATH=os.pathsep.join([skew_dir, str(REPO_ROOT)]))
        self.fleet.env = env
        try:
            self.sups[host] = self.fleet.start("-p", "4", target=TARGET)
        finally:
            self.fleet.env = self.base_env
        return self.sups[host]

    async def ready(self) -> None:
        for sup in self.sups.values():
            await sup.wait_ready(4, timeout=40)

    async def run_for(self, seconds: float) -> None:
        """Let the hosts run for ``seconds``, SIGKILLing one random ready worker process every 3 s."""
        end = time.monotonic() + seconds
        self.next_kill = max(self.next_kill, time.monotonic())  # the clock stood still while they were down
        while (now := time.monotonic()) < end:
            if now >= self.next_kill:
                pids = sorted(pid for sup in self.sups.values() for pid in sup.ready_pids())
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.rng.choice(pids), signal.SIGKILL)
                        self.kills += 1
                self.next_kill = now + KILL_EVERY
            await asyncio.sleep(0.05)

    async def kill_all(self) -> None:
        """SIGKILL both supervisors and every worker process; return once all are gone."""
        pids = {pid for sup in self.sups.values() for pid in sup.child_pids()}
        for sup in self.sups.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sup.pid, signal.SIGKILL)
            pids.add(sup.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.fleet.until(lambda: not any(alive(p) for p in pids), timeout=10, what="every process gone")


async def test_cron_every_second_on_two_hosts_fires_each_tick_once_through_kills_restarts_and_an_outage(
    fleet: Fleet, redis_url: str, prefix: str
) -> None:
    """Every tick gets exactly one job through SIGKILLs every 3 s, a graceful restart of one host, clock
    skew between the hosts, and a full outage, whose ticks follow each schedule's misfire policy."""
    seed = random.randrange(1 << 30)
    hosts = Hosts(fleet, random.Random(seed))
    producer = cron_app.build(redis_url, prefix)
    q = producer.queue(cron_app.QUEUE)
    client = producer.redis()
    started = time.monotonic()
    try:
        hosts.start("A")
        hosts.start("B")
        await hosts.ready()
        await q.schedule(SKIP, "tick", "skip", cron="* * * * * *", misfire="skip", misfire_grace=0.75)
        await hosts.run_for(6.0)

        # Host A restarts gracefully (a deploy): B keeps firing meanwhile.
        hosts.sups["A"].send(signal.SIGTERM)
        assert await hosts.sups["A"].wait_exit(20) == 0
        hosts.start("A")
        await hosts.ready()
        await hosts.run_for(3.0)

        # Everything down: no process fires the ticks of the next few seconds.
        down_at = await commands.server_ms(client)
        await hosts.kill_all()
        await _hold(client, down_at + int(OUTAGE * 1000))
        hosts.start("A")
        hosts.start("B")
        await hosts.ready()
        up_at = await commands.server_ms(client)
        await hosts.run_for(6.0)

        for sup in hosts.sups.values():
            sup.send(signal.SIGTERM)
        for sup in hosts.sups.values():
            assert await sup.wait_exit(20) == 0
        stored = {s.id: s for s in await q.schedules()}
        created = [raw.decode() for raw in await client.hkeys(q.keys.jobs)]
        waiting = {raw.decode() for raw in await client.lrange(q.keys.wait, 0, -1)}
    finally:
        await producer.close()

    runs = read_runs(fleet.ledger_dir)
    by_job: dict[str, list[Run]] = {}
    for r in runs:
        by_job.setdefault(r.job, []).append(r)
    figures: dict[str, object] = {"seed": seed, "kills": hosts.kills, "outage_ms": up_at - down_at}
    window = (down_at - 1000, up_at + 1000)
    for sid in (cron_app.DECLARED, SKIP):
        s = stored[sid]
        assert s.next_run is not None
        ticks = sorted(int(j.rsplit(":", 1)[1]) for j in created if j.startswith(f"sched:{sid}:"))
        cursor = round(s.next_run * 1000)
        every = list(range(ticks[0], cursor, 1000))
        gaps = sorted(set(every) - set(ticks))
        outside = [t for t in gaps if not window[0] <= t <= window[1]]
        jobs = [j for j in created if j.startswith(f"sched:{sid}:")]
        clean = [j for j in jobs if [r.stalls for r in by_job.get(j, [])].count(0) == 1]
        reruns = sum(len(by_job.get(j, [])) - 1 for j in jobs if len(by_job.get(j, [])) > 1)
        unrun = [j for j in jobs if j not in by_job]
        figures[sid] = {
            "ticks": len(every),
            "jobs": len(ticks),
            "fired": s.fired,
            "missed": s.missed,
            "duplicates": len(ticks) - len(set(ticks)),
            "gaps": len(gaps),
            "gaps_outside_outage": len(outside),
            "runs": sum(len(by_job.get(j, [])) for j in jobs),
            "reruns_after_kill": reruns,
            "still_waiting": len(unrun),
        }
        assert len(ticks) == len(set(ticks))
        assert s.fired == len(ticks), "one job per fired tick"
        assert s.fired + s.missed == len(every), "every tick from the first to the cursor accounted for"
        assert outside == [], f"{sid}: ticks without a job outside the outage: {outside}"
        assert len(gaps) >= 2, "the outage spans several ticks"
        assert gaps == list(range(gaps[0], gaps[-1] + 1, 1000)), "the missed ticks are one stretch"
        assert set(unrun) <= waiting, "a job neither ran nor waits"
        assert len(clean) == len(jobs) - len(unrun), "a job ran twice without a crash in between"
        if sid == cron_app.DECLARED:
            # run_once: the outage's ticks got one job, the latest due when the first scheduler came back.
            assert gaps[-1] + 1000 in ticks, "run_once created a job for the outage"

    # The premise: host B's clock was two minutes ahead, host A's was right (run wall clock vs its tick).
    for host, skew in (("A", 0.0), ("B", SKEW)):
        offsets = [r.wall - r.tick / 1000 for r in runs if r.host == host]
        figures[f"host_{host}_clock_minus_tick_s"] = round(statistics.median(offsets), 3)
        assert abs(statistics.median(offsets) - skew) < 5, (host, statistics.median(offsets))
    late = sorted(r.wall - r.tick / 1000 for r in runs if r.host == "A" and r.stalls == 0)
    figures["host_A_start_after_tick_ms"] = {
        "p50": round(1000 * late[len(late) // 2]),
        "p99": round(1000 * late[min(len(late) - 1, int(len(late) * 0.99))]),
    }
    figures["duration_s"] = round(time.monotonic() - started, 1)
    report("cron_fleet", **figures)


async def _hold(client: aioredis.Redis, until_ms: int) -> None:
    """Poll the server's clock until it reads ``until_ms``."""
    while True:
        if await commands.server_ms(client) >= until_ms:
            return
        await asyncio.sleep(0.05)
