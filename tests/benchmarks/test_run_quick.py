"""Smoke test of the performance suite: ``benchmarks/run.py --quick --json`` runs every workload end to end.

Speed targets never go in tests (a noisy CI box would make them flaky); this only checks that every
workload ran and produced positive numbers, for qflow and for the raw redis-py limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = (
    "enqueue_one",
    "enqueue_bulk",
    "enqueue_concurrent",
    "drain_1p",
    "drain_2p",
    "latency",
    "io_bound",
    "rss",
)
RAW_WORKLOADS = ("enqueue_one", "enqueue_bulk", "drain_1p", "drain_2p")


def _bench_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return [k for pattern in ("qflowbench-*", "rawbench-*") for k in client.scan_iter(match=pattern)]
    finally:
        client.close()


def test_quick_run_reports_every_workload_with_positive_rates(redis_url: str) -> None:
    """`run.py --quick --json` measures every workload for qflow and the raw limit, then deletes its keys."""
    before = set(_bench_keys(redis_url))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", "--url", redis_url],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)

    results = doc["results"]
    assert set(results) == set(WORKLOADS)
    for workload in WORKLOADS:
        qflow = results[workload]["qflow"]
        assert qflow["status"] == "ok", (workload, qflow)
        assert qflow["rate"] > 0, (workload, qflow)
        assert qflow["cpu_us"] > 0, (workload, qflow)
        assert qflow["cmds_per_job"] > 0, (workload, qflow)
    for workload in RAW_WORKLOADS:
        raw = results[workload]["raw"]
        assert raw["status"] == "ok", (workload, raw)
        assert raw["rate"] > 0, (workload, raw)
    latency = results["latency"]["qflow"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert results["io_bound"]["qflow"]["pct_ideal"] > 0
    assert "rss_kib_per_10k" in results["rss"]["qflow"]
    assert doc["goals"], "the goals table is computed"
    assert doc["machine"]["cores"] >= 1
    assert set(_bench_keys(redis_url)) <= before, "the run deletes the keys it wrote"
