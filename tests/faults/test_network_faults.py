"""Network faults through the fault proxy (issue #5): a blackhole longer than the lease, connection resets,
one lost reply on ``add(job_id=...)``, 200 ms of added latency.

Guarantees (DESIGN.md): socket timeouts are always set, so a dead TCP path is detected in seconds; a worker
cut off past its lease has its jobs recovered by the others, and its late acks change nothing (3); an
idempotent add retried after a lost reply makes one job (1); latency alone never makes a lease lapse when
leases are long enough. A silent or hanging-up server at ``add`` (no proxy needed) is in
tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis

import qflow
from qflow._broker import scripts
from tests.faults.conftest import (
    KEEP,
    TRIM_KEEP,
    FaultWorkers,
    Running,
    add_work,
    assert_clean,
    failures_logged,
    inject_rounds,
    ledger_figures,
    settle,
)
from tests.faults.harness import (
    PROFILE,
    RECOVERY_BOUND,
    SOCKET_TIMEOUT,
    FaultWindow,
    Figures,
    Finished,
    Proxy,
    ValkeyServer,
    check,
    completions,
    in_flight,
    poll,
    seconds,
    snapshot,
)
from tests.faults.test_worker_crashes import result_pid
from tests.process import ledger_app

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def proxied_producer(proxy: Proxy, fault_prefix: str) -> AsyncIterator[qflow.Queue]:
    """The producer side of ``ledger_app`` through the proxy, with a short socket timeout (0.5 s)."""
    app, queue = ledger_app.build_app(
        proxy.url, fault_prefix, settings=PROFILE, socket_timeout=0.5, keep=KEEP
    )
    yield queue
    await app.close()


async def test_blackhole_longer_than_the_lease_is_detected_and_zombie_acks_change_nothing(
    proxy: Proxy, fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """Worker A's path to Redis goes silent (sockets open, bytes dropped) for 3x the lease while it runs two
    long jobs: A notices within a socket timeout, B recovers the jobs within lease + check interval and
    records their outcome; A's late acks, once the path is back, are rejected; then A takes new jobs again."""
    hole_s = 3.0
    b = await fault_workers.start(concurrency=2, max_sleep=0.05)
    b.popen.send_signal(signal.SIGSTOP)  # B is up but frozen while A claims both jobs
    try:
        a = await fault_workers.start(concurrency=2, url=proxy.url)
        ids = await add_work(producer, 2, seconds=hole_s + 0.5)
        await fault_workers.until(
            lambda led: len(led.events("start", pid=a.pid)) == 2, what="A to run both jobs"
        )
    finally:
        b.popen.send_signal(signal.SIGCONT)
    cut_at = proxy.set_mode("blackhole")
    await poll(lambda: time.monotonic() - cut_at >= hole_s, timeout=hole_s + 1, what="the blackhole")
    healed_at = proxy.set_mode("pass")
    snap, _ = await settle(direct, producer, ids, timeout=15, details=fault_workers.logs)
    # A's handlers end after the path is back: their acks reach Redis and are rejected (or the renewal
    # that finds the leases gone cancels them first). Wait until A has dealt with both.
    await fault_workers.until(
        lambda led: len(led.events("end", pid=a.pid)) + len(led.events("cancel", pid=a.pid)) >= 2,
        what="A's handlers to end",
    )
    await poll(
        lambda: any(
            "rejected" in (e.msg or "") or "lost" in (e.msg or "") or "could not record" in (e.msg or "")
            for e in fault_workers.ledger().events("log", pid=a.pid)
            if e.t > healed_at
        ),
        timeout=5,
        what="A to learn its deliveries were taken over",
    )
    # A is back: with B frozen, only A can run a new job.
    b.popen.send_signal(signal.SIGSTOP)
    try:
        t_new = time.monotonic()
        (new,) = await add_work(producer, 1, seconds=0.0)
        snap, done_at = await settle(direct, producer, [*ids, new], timeout=10, details=fault_workers.logs)
    finally:
        b.popen.send_signal(signal.SIGCONT)
    led = fault_workers.ledger()
    detected = min(failures_logged(led, a.pid, cut_at), default=None)
    recovered = [e.t for e in led.events("start", pid=b.pid) if e.job in ids]
    added = dict.fromkeys([*ids, new], cut_at)
    hit = in_flight(led, [FaultWindow("blackhole", cut_at, healed_at, a.pid)], added)
    c = check(snap, [*ids, new], in_flight=hit)
    zombie_logs = [e.msg for e in led.events("log", pid=a.pid) if e.t > healed_at]
    Figures(
        "network_blackhole",
        jobs=3,
        lost=c.lost,
        dup=ledger_figures(led, ids)["dup"],
        dup_bound=len(ids),
        healthy_failed=c.healthy_failed,
        blackhole_s=hole_s,
        detected_s=seconds(None if detected is None else detected - cut_at),
        recovery_s=seconds(min(recovered) - cut_at if recovered else None),
        back_s=seconds(done_at - t_new),
        stale_acks=snap.stats.get("stale_acks", 0),
        zombie_rejected=sum("rejected" in (m or "") for m in zombie_logs),
        dropped_bytes=proxy.dropped,
    ).emit()

    assert_clean(c)
    assert {i: result_pid(snap.results[i]) for i in ids} == dict.fromkeys(ids, b.pid), "B's outcome only"
    assert result_pid(snap.results[new]) == a.pid, "A works again once the path is back"
    assert detected is not None
    assert detected - cut_at <= SOCKET_TIMEOUT + PROFILE.lease_ttl / 3 + 1.0, "detected within seconds"
    assert recovered
    assert min(recovered) - cut_at <= RECOVERY_BOUND
    assert snap.stats.get("completed", 0) == 3


async def test_connection_resets_lose_nothing_and_run_nothing_twice(
    proxy: Proxy,
    server: ValkeyServer,
    fault_workers: FaultWorkers,
    proxied_producer: qflow.Queue,
    direct: redis.Redis,
) -> None:
    """Every connection (both workers' and the producer's) reset three times under load, with retention
    trimming all along: clients reconnect, a lost add is retried with its id, a lost claim reply comes back by
    lease; nothing lost or run twice, every job completed, the finished sets within their bound."""
    env = {ledger_app.ENV_KEEP: str(TRIM_KEEP)}
    a = await fault_workers.start(concurrency=4, url=proxy.url, env=env)
    b = await fault_workers.start(concurrency=4, url=proxy.url, env=env)
    faults: list[FaultWindow] = []
    with (
        Finished(server, proxied_producer.keys, keep=TRIM_KEEP) as fin,
        Running(proxied_producer, rate=40, seconds=0.1) as run,
    ):
        await poll(lambda: completions(direct, proxied_producer.keys) >= 20, timeout=15, what="jobs flowing")
        resets = await inject_rounds(proxy.reset_all, direct, proxied_producer, "reset", faults=faults)
        acked = await run.stop()
        snap, _ = await settle(
            direct, proxied_producer, acked, timeout=20, details=fault_workers.logs, finished=fin
        )
    led = fault_workers.ledger()
    hit = in_flight(led, faults, run.load.tried_at)
    c = check(snap, acked, in_flight=hit, finished=fin, keep=TRIM_KEEP)
    figs = ledger_figures(led, acked)
    Figures(
        "network_reset",
        jobs=len(acked),
        lost=c.lost,
        dup=figs["dup"],
        dup_bound=0,
        healthy_failed=c.healthy_failed,
        trimmed=c.trimmed,
        completed_max=c.completed_max,
        keep=TRIM_KEEP,
        connections_reset=resets,
        stalled=snap.stats.get("stalled", 0),
        stale_acks=snap.stats.get("stale_acks", 0),
        producer_failures=run.load.failures,
    ).emit()

    assert all(p.popen.poll() is None for p in (a, b))
    assert_clean(c)
    assert all(n >= 3 for n in resets), "each round cut the workers' and the producer's connections"
    assert figs["dup"] == 0


async def test_lost_reply_on_add_with_job_id_retried_makes_one_job(
    proxy: Proxy,
    server: ValkeyServer,
    fault_workers: FaultWorkers,
    proxied_producer: qflow.Queue,
    direct: redis.Redis,
) -> None:
    """The reply to ``add(job_id=...)`` is lost: the caller gets BrokerUnavailable after its socket timeout,
    although the job was written; retrying the same call returns the same job, which runs once."""
    await proxied_producer.add(ledger_app.PROCESSOR, ledger_app.Work(seconds=0), job_id="warm-up")
    proxy.set_mode("drop_replies")
    t0 = time.monotonic()
    with pytest.raises(qflow.BrokerUnavailable):
        await proxied_producer.add(ledger_app.PROCESSOR, ledger_app.Work(seconds=0.05), job_id="once")
    failed_after = time.monotonic() - t0
    written = direct.hget(proxied_producer.keys.state, "once")
    proxy.set_mode("pass")
    job = await proxied_producer.add(ledger_app.PROCESSOR, ledger_app.Work(seconds=0.05), job_id="once")
    assert job.id == "once"
    await fault_workers.start(concurrency=2)
    snap, _ = await settle(direct, proxied_producer, ["warm-up", "once"], timeout=10)
    led = fault_workers.ledger()
    c = check(snap, ["warm-up", "once"])
    Figures(
        "network_lost_add_reply",
        jobs=1,
        lost=c.lost,
        dup=ledger_figures(led, ["once"])["dup"],
        dup_bound=0,
        healthy_failed=c.healthy_failed,
        add_failed_s=seconds(failed_after),
        written_before_retry=written is not None,
        runs=len(led.events("start", job="once")),
    ).emit()

    assert_clean(c)
    assert written == b"waiting", "the lost-reply add did land"
    assert failed_after < 0.5 * 3 + 0.5, "the caller learns within its socket timeout (one try, no retry)"
    assert len(led.events("start", job="once")) == 1
    assert snap.stats.get("completed", 0) == 2


@pytest.mark.parametrize("outcome", ["complete", "fail"])
async def test_lost_reply_on_an_ack_retried_records_one_outcome_and_no_stale_ack(
    outcome: str,
    proxy: Proxy,
    fault_workers: FaultWorkers,
    producer: qflow.Queue,
    direct: redis.Redis,
) -> None:
    """The reply to a worker's complete (or fail) is lost after Redis recorded it: the worker's retry finds
    its own outcome already recorded and takes it as done. Not a stale ack (neither Redis nor the worker
    counts one; no "rejected" or "could not record" in the worker's log); the job ran once and ended
    completed (or failed, as timed out) once."""
    # Socket timeout 1 s, lease 4 s: the retry goes out on a new connection well within the lease.
    env = {ledger_app.ENV_LEASE: "4.0", ledger_app.ENV_SOCKET_TIMEOUT: "1.0"}
    a = await fault_workers.start(concurrency=1, url=proxy.url, env=env)
    work = ledger_app.Work(seconds=1.0 if outcome == "complete" else 30.0)
    # fail: the handler outlives its 1 s timeout, and one attempt is all it has.
    options = {} if outcome == "complete" else {"timeout": 1.0, "attempts": 1}
    # A first job of the same kind, so the server has the ack's script: a NOSCRIPT reply lost like the
    # others would leave the script unrun (the EVAL fallback needs that reply).
    warm = ledger_app.Work(seconds=0.0) if outcome == "complete" else work
    await producer.add(ledger_app.PROCESSOR, warm, job_id="warm-up", **options)
    warmed, _ = await settle(direct, producer, ["warm-up"], timeout=10, details=fault_workers.logs)
    # The reply to the next call of the ack's script is lost (that connection goes deaf); nothing else is.
    proxy.deafen_after(scripts.SCRIPTS[outcome].sha.encode())
    await producer.add(ledger_app.PROCESSOR, work, job_id="acked", **options)
    await poll(
        lambda: direct.hget(producer.keys.state, "acked") in (b"completed", b"failed"),
        timeout=15,
        what="Redis to record the outcome",
    )
    dropped = proxy.dropped
    # A graceful stop waits for the outcome in flight (the retry included), so once A exited, it is final.
    a.send(signal.SIGTERM)
    assert await a.wait_exit(timeout=15) == 0
    snap = snapshot(direct, producer.keys)
    led = fault_workers.ledger()
    c = check(snap, ["acked"], unhealthy=[] if outcome == "complete" else ["acked"])
    complaints = [
        e.msg
        for e in led.events("log", pid=a.pid)
        if "rejected" in (e.msg or "") or "could not record" in (e.msg or "")
    ]
    Figures(
        f"network_lost_{outcome}_reply",
        jobs=1,
        lost=c.lost,
        dup=ledger_figures(led, ["acked"])["dup"],
        dup_bound=0,
        healthy_failed=c.healthy_failed,
        dropped_bytes=dropped,
        stale_acks=snap.stats.get("stale_acks", 0),
        worker_complaints=len(complaints),
    ).emit()

    assert len(proxy.deafened) == 1, "the ack's reply was lost"
    assert dropped > 0
    assert_clean(c)
    assert len(led.events("start", job="acked")) == 1
    if outcome == "complete":
        assert snap.state["acked"] == "completed"
        assert result_pid(snap.results["acked"]) == a.pid
    else:
        assert snap.state["acked"] == "failed"
        assert snap.failure_kind("acked") == "timeout"
    recorded = snap.stats.get(snap.state["acked"], 0) - warmed.stats.get(snap.state["acked"], 0)
    assert recorded == 1, "one outcome recorded"
    assert snap.stats.get("stale_acks", 0) == 0, "the retry of a recorded outcome was counted as stale"
    assert complaints == [], "the worker took its own recorded outcome for a rejected one"


@pytest.mark.slow  # ~11 s: every start-up round trip costs 400 ms
async def test_200ms_latency_makes_no_lease_lapse(
    proxy: Proxy, fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """Every byte between the workers and Redis delayed 200 ms each way (400 ms round trips): with leases long
    enough (5 s, renewed every 1.7 s) no lease lapses: no stall, no stale ack, no job run twice, none lost."""
    lease = 5.0
    env = {ledger_app.ENV_LEASE: str(lease), ledger_app.ENV_SOCKET_TIMEOUT: "3.0"}
    proxy.set_mode("latency", latency=0.2)
    await fault_workers.start(concurrency=8, url=proxy.url, env=env)
    await fault_workers.start(concurrency=8, url=proxy.url, env=env)
    t0 = time.monotonic()
    # Jobs of 2 s: each lives through a renewal or two at 400 ms a round trip, on a server that has no
    # script loaded yet (the slowest renewals of all).
    acked = await add_work(producer, 16, seconds=2.0)
    snap, _ = await settle(direct, producer, acked, timeout=30, details=fault_workers.logs)
    elapsed = time.monotonic() - t0
    c = check(snap, acked)
    figs = ledger_figures(fault_workers.ledger(), acked)
    Figures(
        "network_latency_200ms",
        jobs=len(acked),
        lost=c.lost,
        dup=figs["dup"],
        dup_bound=0,
        healthy_failed=c.healthy_failed,
        lease_s=lease,
        jobs_per_s=round(len(acked) / elapsed, 1),
        stalled=snap.stats.get("stalled", 0),
        stale_acks=snap.stats.get("stale_acks", 0),
    ).emit()

    assert_clean(c)
    assert figs["dup"] == 0
    assert snap.stats.get("stalled", 0) == 0
    assert snap.stats.get("stale_acks", 0) == 0


async def test_renewal_without_its_script_reloads_it_in_one_extra_round_trip(
    server: ValkeyServer, fault_workers: FaultWorkers, producer: qflow.Queue, direct: redis.Redis
) -> None:
    """On a server that has every script but ``renew`` (as after a restart or SCRIPT FLUSH, for one of them),
    a worker's renewals meet NOSCRIPT at most once: the fallback sends the source, not the SHA again."""
    from qflow._broker.scripts import SCRIPT_NAMES, load_source

    for name in SCRIPT_NAMES:
        if name != "renew":
            direct.script_load(load_source(name))
    await fault_workers.start(concurrency=1)
    ids = await add_work(producer, 1, seconds=PROFILE.lease_ttl * 1.5)
    await settle(direct, producer, ids, timeout=10, details=fault_workers.logs)
    noscript = int(direct.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0))
    Figures("renew_noscript_round_trips", noscript_replies=noscript, bound=1).emit()
    assert noscript <= 1
