"""qflow's performance suite (issue #6): its workloads, the raw redis-py limit and, with ``--peers``, peers.

    python benchmarks/run.py                 # qflow + the raw limit, medians of 3 runs
    python benchmarks/run.py --peers         # + arq, SAQ, taskiq-redis, streaQ, Dramatiq, Celery
    python benchmarks/run.py --quick --json  # small N, machine-readable (the smoke test runs this)
    python benchmarks/run.py --hiredis       # qflow and the raw limit with redis-py's C parser
    python benchmarks/run.py --long          # the RSS run over 200,000 jobs instead of 50,000
    python benchmarks/run.py --only rss --rss-jobs 1000000 --timeout 900   # worker RSS over a million jobs
    python benchmarks/run.py --variants      # + qflow with/without hiredis and on uvloop, in the same run
    python benchmarks/run.py --claim-behind  # + qflow with WorkerSettings(claim_behind_wait=True)
    python benchmarks/run.py --candidate /tmp/patched   # + a patched qflow (/tmp/patched/qflow), same run

Without ``--url`` a throwaway valkey-server is started (``qflow.testing.local_server``) and flushed between
workloads; with ``--url`` only the run's own keys are deleted (unique namespaces per workload). Every system
runs in separate processes speaking a small JSON protocol (``benchmarks/peers/_protocol.py``); each peer is
installed into its own virtual environment under ``~/.cache/qflow-bench`` (``QFLOW_BENCH_CACHE``). Every
step has a deadline: a system that fails or runs out of time is reported as such, its processes killed.

Measured per workload: jobs/s; pickup latency percentiles; CPU µs per job of the worker process(es) (or of
the producer, for enqueue rows) from ``time.process_time()``; Redis server CPU µs per job (``INFO cpu``
deltas); Redis commands per job (``INFO commandstats`` deltas, by name); Redis memory per job (``INFO memory``
``used_memory`` delta, with qflow keeping every completed job).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    PEERS_DIR,
    AdapterError,
    Proc,
    Server,
    ensure_venv,
    log,
    machine,
    median,
    percentile,
)

from qflow.testing import local_server

# Each peer in its own venv: their pins conflict (arq needs redis<6). Versions pinned for reproducibility.
PEERS: dict[str, list[str]] = {
    "arq": ["arq==0.28.0", "hiredis==3.5.0"],
    "saq": ["saq[hiredis]==0.26.4", "typing_extensions"],  # saq imports it without declaring it,
    "taskiq": ["taskiq==0.13.0", "taskiq-redis==1.2.4", "hiredis==3.5.0"],
    "streaq": ["streaq==7.2.0"],  # coredis, not redis-py: its own parser
    "dramatiq": ["dramatiq[redis]==2.2.1", "hiredis==3.5.0"],
    "celery": ["celery[redis]==5.7.0", "hiredis==3.5.0"],
}
FAST_VARIANT = ["hiredis==3.5.0", "uvloop==0.22.1"]

WORKLOADS: dict[str, str] = {
    "enqueue_one": "enqueue, one awaited add at a time",
    "enqueue_bulk": "enqueue, bulk API",
    "enqueue_concurrent": "enqueue, concurrent producer (gather)",
    "drain_1p": "drain no-op jobs, 1 process x c=100",
    "drain_2p": "drain no-op jobs, 2 processes x c=100",
    "latency": "pickup latency, idle worker, 500 jobs/s",
    "io_bound": "sleep(0.05) jobs, c=100 (ideal 2,000/s)",
    "rss": "worker RSS over a long drain",
}
RAW_WORKLOADS = ("enqueue_one", "enqueue_bulk", "drain_1p", "drain_2p")
PEER_WORKLOADS = (
    "enqueue_one",
    "enqueue_bulk",
    "enqueue_concurrent",
    "drain_1p",
    "drain_2p",
    "latency",
    "io_bound",
)
CONCURRENCY = 100
SLEEP = 0.05


@dataclass(frozen=True)
class Sizes:
    one: int = 5_000
    bulk: int = 20_000
    drain: int = 20_000
    latency_rate: float = 500.0
    latency_n: int = 1_500
    io: int = 5_000
    rss: int = 50_000


QUICK = Sizes(one=300, bulk=1_000, drain=1_000, latency_n=100, io=400, rss=2_000)


@dataclass
class System:
    key: str
    python: str
    script: Path
    env: dict[str, str]
    workloads: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def argv(self, url: str, command: str, ns: str, *extra: str) -> list[str]:
        return [self.python, "-P", str(self.script), command, "--url", url, "--ns", ns, *extra]

    def proc(self, url: str, command: str, ns: str, *extra: str) -> Proc:
        return Proc(self.argv(url, command, ns, *extra), self.env, f"{self.key} {command}")

    def patterns(self, ns: str) -> list[str]:
        return [p.replace("{ns}", ns) for p in self.info.get("keys", [])]


class Bench:
    """Runs workloads for systems on one server; every method cleans up its processes and keys."""

    def __init__(self, server: Server, sizes: Sizes, timeout: float) -> None:
        self.server = server
        self.url = server.url
        self.sizes = sizes
        self.timeout = timeout

    @contextlib.contextmanager
    def namespace(self, system: System) -> Iterator[str]:
        ns = f"b{uuid.uuid4().hex[:10]}"
        procs: list[Proc] = []
        self._procs = procs
        try:
            yield ns
        finally:
            for p in procs:
                p.kill()
            patterns = system.patterns(ns)
            if not self.server.owned:
                # On a server we did not start, only delete keys that carry this run's namespace: a peer's
                # global keys (arq's `arq:job:*`) may belong to someone else. arq's expire on their own.
                patterns = [p for p in patterns if ns in p]
            self.server.clean(patterns)

    def _spawn(self, system: System, command: str, ns: str, *extra: str) -> Proc:
        p = system.proc(self.url, command, ns, *extra)
        self._procs.append(p)
        return p

    def _enqueue(
        self, system: System, ns: str, mode: str, n: int, *extra: str, counters: list[Any] | None = None
    ) -> dict[str, Any]:
        """Run one enqueue command; with ``counters``, append server snapshots taken around the timed part."""
        p = self._spawn(system, "enqueue", ns, "--mode", mode, "--n", str(n), *extra)
        p.wait_ready(60)
        if counters is not None:
            counters.append(self.server.snapshot())
        p.send("go")
        res = p.result(self.timeout)
        if counters is not None:
            counters.append(self.server.snapshot())
        return res

    def _fill(self, system: System, ns: str, n: int, sleep: float) -> None:
        mode = "bulk" if system.info.get("bulk") else "concurrent" if system.info.get("concurrent") else "one"
        self._enqueue(system, ns, mode, n, "--sleep", str(sleep))

    # -- workloads ---------------------------------------------------------------------------------------

    def enqueue(self, system: System, mode: str, n: int) -> dict[str, Any]:
        if mode == "bulk" and not system.info.get("bulk"):
            return {"status": "n/a", "note": "no bulk enqueue API"}
        if mode == "concurrent" and not system.info.get("concurrent"):
            return {"status": "n/a", "note": "synchronous client"}
        counters: list[Any] = []
        with self.namespace(system) as ns:
            res = self._enqueue(system, ns, mode, n, counters=counters)
        before, after = counters
        return {
            "rate": n / res["seconds"],
            "cpu_us": res["cpu"] * 1e6 / n,
            **Server.delta(before, after, n),
            "mem_per_job": (after["mem"] - before["mem"]) / n,
        }

    def drain(
        self,
        system: System,
        n: int,
        *,
        procs: int = 1,
        sleep: float = 0.0,
        retain: bool = True,
        sample_rss: bool = False,
    ) -> dict[str, Any]:
        extra = ["--concurrency", str(CONCURRENCY)]
        if retain:
            extra += ["--retain", str(n + 1000)]
        with self.namespace(system) as ns:
            workers = [self._spawn(system, "worker", ns, *extra) for _ in range(procs)]
            for w in workers:
                w.wait_ready(60)
            s0 = self.server.snapshot()
            self._fill(system, ns, n, sleep)
            s1 = self.server.snapshot()
            for w in workers:
                w.send("go")
            deadline = time.monotonic() + self.timeout
            rss_warm = None
            done = 0
            while True:
                done = sum(w.progress.get("done", 0) for w in workers)
                if sample_rss and rss_warm is None and done >= n * 0.1:
                    rss_warm = workers[0].progress.get("rss")
                if done >= n:
                    break
                dead = [w for w in workers if not w.alive()]
                if dead:
                    raise dead[0].fail(f"worker died after {done} of {n} jobs")
                if time.monotonic() > deadline:
                    return {"status": "timeout", "note": f"{done}/{n} jobs in {self.timeout:.0f}s"}
                time.sleep(0.01)
            time.sleep(0.3)  # let the last acks land before reading the server's counters
            s2 = self.server.snapshot()
            finals = [w.stop() for w in workers]
        if any(f is None for f in finals):
            raise AdapterError(f"{system.key}: a worker gave no final report")
        first = min(f["first"] for f in finals if f["first"])  # type: ignore[index]
        last = max(f["last"] for f in finals)  # type: ignore[index]
        out = {
            "rate": n / (last - first),
            "cpu_us": sum(f["cpu"] - f["cpu0"] for f in finals) * 1e6 / n,  # type: ignore[index]
            **Server.delta(s1, s2, n),
            "mem_per_job": (s2["mem"] - s0["mem"]) / n,
        }
        if sleep:
            out["pct_ideal"] = 100 * out["rate"] / (CONCURRENCY * procs / sleep)
        if sample_rss:
            rss_end = finals[0]["rss"]  # type: ignore[index]
            warm = rss_warm if rss_warm is not None else rss_end
            out["rss_kib"] = rss_end
            out["rss_kib_per_10k"] = (rss_end - warm) / (n * 0.9) * 10_000
        return out

    def latency(self, system: System) -> dict[str, Any]:
        n, rate = self.sizes.latency_n, self.sizes.latency_rate
        with self.namespace(system) as ns:
            w = self._spawn(system, "worker", ns, "--concurrency", str(CONCURRENCY), "--latency")
            w.wait_ready(60)
            w.send("go")
            time.sleep(0.5)  # the worker is idle, blocked on the server
            s1 = self.server.snapshot()
            res = self._enqueue(system, ns, "paced", n, "--rate", str(rate))
            deadline = time.monotonic() + 10
            while w.progress.get("done", 0) < n:
                if time.monotonic() > deadline or not w.alive():
                    raise w.fail(f"only {w.progress.get('done', 0)} of {n} paced jobs ran")
                time.sleep(0.01)
            time.sleep(0.3)
            s2 = self.server.snapshot()
            final = w.stop()
        if final is None:
            raise AdapterError(f"{system.key}: the worker gave no final report")
        lat = [x / 1e6 for x in final["latencies"][min(10, n // 10) :]]  # the first few warm up
        return {
            "rate": n / res["seconds"],
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "max_ms": max(lat),
            "cpu_us": (final["cpu"] - final["cpu0"]) * 1e6 / n,
            **Server.delta(s1, s2, n),
        }

    def run(self, system: System, workload: str) -> dict[str, Any]:
        z = self.sizes
        calls: dict[str, Callable[[], dict[str, Any]]] = {
            "enqueue_one": lambda: self.enqueue(system, "one", z.one),
            "enqueue_bulk": lambda: self.enqueue(system, "bulk", z.bulk),
            "enqueue_concurrent": lambda: self.enqueue(system, "concurrent", z.bulk),
            "drain_1p": lambda: self.drain(system, z.drain),
            "drain_2p": lambda: self.drain(system, z.drain, procs=2),
            "latency": lambda: self.latency(system),
            "io_bound": lambda: self.drain(system, z.io, sleep=SLEEP),
            "rss": lambda: self.drain(system, z.rss, retain=False, sample_rss=True),
        }
        try:
            out = calls[workload]()
        except AdapterError as exc:
            return {"status": "error", "note": str(exc)}
        except Exception as exc:
            return {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
        out.setdefault("status", "ok")
        return out


# -- systems ---------------------------------------------------------------------------------------------


def qflow_systems(args: argparse.Namespace) -> list[System]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    python = sys.executable
    if args.hiredis or args.uvloop:
        python = str(ensure_venv("qflow-fast", FAST_VARIANT, link_current=True))
    if args.hiredis is False:
        env["QFLOW_BENCH_NO_HIREDIS"] = "1"
    if args.uvloop:
        env["QFLOW_BENCH_UVLOOP"] = "1"
    if args.baseline:
        # A frozen copy of the engine: the working tree may change while a long run goes on.
        env["PYTHONPATH"] = str(args.baseline.resolve())
    qflow_workloads = tuple(w for w in WORKLOADS if w in args.only)
    systems = [System("qflow", python, PEERS_DIR / "qflow.py", env, qflow_workloads)]
    if args.variants:
        # The same engine with the other parser and on uvloop, in the same run (same noise) as the baseline.
        fast = str(ensure_venv("qflow-fast", FAST_VARIANT, link_current=True))
        base = {k: v for k, v in env.items() if not k.startswith("QFLOW_BENCH_")}  # PYTHONPATH kept
        for key, extra in (
            ("qflow-hiredis", {}),
            ("qflow-pyparser", {"QFLOW_BENCH_NO_HIREDIS": "1"}),
            ("qflow-uvloop", {"QFLOW_BENCH_UVLOOP": "1"}),
        ):
            systems.append(System(key, fast, PEERS_DIR / "qflow.py", {**base, **extra}, qflow_workloads))
    if args.claim_behind:
        cb_env = {**env, "QFLOW_BENCH_CLAIM_BEHIND": "1"}
        systems.append(System("qflow-claim-behind", python, PEERS_DIR / "qflow.py", cb_env, qflow_workloads))
    for i, folder in enumerate(args.candidate or [], 1):
        # A patched copy of the engine, measured beside the baseline in the same run (same noise).
        cand_env = {**env, "PYTHONPATH": str(folder.resolve())}
        systems.append(System(f"candidate{i}", python, PEERS_DIR / "qflow.py", cand_env, qflow_workloads))
    raw = System("raw", python, PEERS_DIR / "raw.py", env, tuple(w for w in RAW_WORKLOADS if w in args.only))
    return [*systems, raw]


def peer_systems(args: argparse.Namespace) -> list[System]:
    names = list(PEERS) if args.peers == "all" else [p.strip() for p in args.peers.split(",") if p.strip()]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QFLOW_BENCH_UVLOOP")}
    if args.hiredis is False:
        env["QFLOW_BENCH_NO_HIREDIS"] = "1"
    systems = []
    for name in names:
        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        try:
            python = str(ensure_venv(name, PEERS[name]))
        except (AdapterError, OSError, Exception) as exc:
            log(f"  {name}: install failed: {exc}")
            python = ""
        workloads = tuple(w for w in PEER_WORKLOADS if w in args.only)
        systems.append(System(name, python, PEERS_DIR / f"{name}.py", env, workloads))
    return systems


def describe(system: System, url: str) -> None:
    if not system.python:
        system.info = {"name": system.key, "error": "not installed"}
        return
    p = Proc(system.argv(url, "info", "x"), system.env, f"{system.key} info")
    try:
        system.info = p.result(120)
    except AdapterError as exc:
        system.info = {"name": system.key, "error": str(exc)}
    finally:
        p.kill()


# -- report ----------------------------------------------------------------------------------------------


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each number over the repetitions that succeeded; ``cmds`` from the median-rate run."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1] if runs else {"status": "n/a"}
    out: dict[str, Any] = {"status": "ok", "runs": len(ok)}
    for key in ok[0]:
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values and key not in ("status", "runs"):
            out[key] = median(values)
    by_rate = sorted(ok, key=lambda r: r.get("rate", 0))
    out["cmds"] = by_rate[len(by_rate) // 2].get("cmds", {})
    if len(ok) < len(runs):
        out["note"] = f"{len(runs) - len(ok)} of {len(runs)} runs failed"
    return out


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def cell(result: dict[str, Any] | None, workload: str) -> str:
    if result is None:
        return "-"
    status = result.get("status")
    if status != "ok":
        return str(status)
    if workload == "latency":
        return f"{fmt(result['p50_ms'], 2)} / {fmt(result['p99_ms'], 2)} ms"
    if workload == "io_bound":
        return f"{fmt(result['rate'])} ({fmt(result['pct_ideal'], 1)}%)"
    if workload == "rss":
        return f"{fmt(result['rate'])} (+{fmt(result['rss_kib_per_10k'], 0)} KiB/10k)"
    return fmt(result["rate"])


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def goals(results: dict[str, dict[str, dict[str, Any]]], peers: list[str]) -> list[dict[str, Any]]:
    """Each goal of issue #6 as a ratio measured in this run: value, target, met."""

    def rate(w: str, s: str) -> float | None:
        r = results.get(w, {}).get(s)
        return r["rate"] if r and r.get("status") == "ok" else None

    def best_peer(w: str) -> tuple[str, float] | None:
        cands = [(p, rate(w, p)) for p in peers]
        ok = [(p, v) for p, v in cands if v]
        return max(ok, key=lambda pv: pv[1]) if ok else None

    out: list[dict[str, Any]] = []

    def ratio(goal: str, num: float | None, den: float | None, target: float, versus: str) -> None:
        if num is None or not den:
            out.append({"goal": goal, "value": None, "target": target, "met": None, "versus": versus})
            return
        v = num / den
        out.append({"goal": goal, "value": v, "target": target, "met": v >= target, "versus": versus})

    for w, target in (("drain_1p", 3.0), ("drain_2p", 3.0), ("enqueue_bulk", 2.5)):
        bp = best_peer(w) if peers else None
        if peers:
            ratio(
                f"{w}: qflow / best peer >= {target}x",
                rate(w, "qflow"),
                bp[1] if bp else None,
                target,
                bp[0] if bp else "no peer ran",
            )
    ratio(
        "drain_1p: qflow / raw limit >= 30%", rate("drain_1p", "qflow"), rate("drain_1p", "raw"), 0.30, "raw"
    )
    ratio(
        "enqueue_one: qflow / one-round-trip limit >= 90%",
        rate("enqueue_one", "qflow"),
        rate("enqueue_one", "raw"),
        0.90,
        "raw",
    )
    lat = results.get("latency", {}).get("qflow")
    if lat and lat.get("status") == "ok":
        out.append({"goal": "pickup p50 <= 0.3 ms", "value": lat["p50_ms"], "target": 0.3,
                    "met": lat["p50_ms"] <= 0.3, "unit": "ms"})  # fmt: skip
        out.append({"goal": "pickup p99 <= 1 ms", "value": lat["p99_ms"], "target": 1.0,
                    "met": lat["p99_ms"] <= 1.0, "unit": "ms"})  # fmt: skip
    io = results.get("io_bound", {}).get("qflow")
    if io and io.get("status") == "ok":
        out.append({"goal": "I/O-bound >= 98% of ideal", "value": io["pct_ideal"], "target": 98.0,
                    "met": io["pct_ideal"] >= 98.0, "unit": "%"})  # fmt: skip
    d1 = results.get("drain_1p", {}).get("qflow")
    if d1 and d1.get("status") == "ok":
        out.append({"goal": "worker CPU per no-op job <= 50 us (drain_1p)", "value": d1["cpu_us"],
                    "target": 50.0, "met": d1["cpu_us"] <= 50.0, "unit": "us"})  # fmt: skip
        one = results.get("enqueue_one", {}).get("qflow")
        if one and one.get("status") == "ok":
            life = one["server_cpu_us"] + d1["server_cpu_us"]
            out.append({"goal": "server CPU per job <= 15 us (add one at a time + claim + complete)",
                        "value": life, "target": 15.0, "met": life <= 15.0, "unit": "us"})  # fmt: skip
            cmds = one["cmds_per_job"] + d1["cmds_per_job"]
            out.append({"goal": "Redis commands per job lifecycle (stated, incl. those inside scripts)",
                        "value": cmds, "target": None, "met": None, "unit": "cmds"})  # fmt: skip
        bulk = results.get("enqueue_bulk", {}).get("qflow")
        if bulk and bulk.get("status") == "ok":
            life = bulk["server_cpu_us"] + d1["server_cpu_us"]
            out.append({"goal": "server CPU per job <= 15 us (bulk add + claim + complete)",
                        "value": life, "target": 15.0, "met": life <= 15.0, "unit": "us"})  # fmt: skip
        out.append({"goal": "Redis memory per completed job (stated; all kept)", "value": d1["mem_per_job"],
                    "target": None, "met": None, "unit": "B"})  # fmt: skip
    rss = results.get("rss", {}).get("qflow")
    if rss and rss.get("status") == "ok":
        per = rss["rss_kib_per_10k"]
        out.append({"goal": "worker RSS flat: growth <= 100 KiB per 10k jobs (<= ~10 MiB per 1M)",
                    "value": per, "target": 100.0, "met": per <= 100.0, "unit": "KiB/10k"})  # fmt: skip
    return out


def report(doc: dict[str, Any]) -> str:
    systems: dict[str, dict[str, Any]] = doc["systems"]
    results: dict[str, dict[str, dict[str, Any]]] = doc["results"]
    keys = list(systems)
    m = doc["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}; redis-py {m['redis_py']}; "
        f"server {doc['server']}",
        f"run: {doc['config']['command']}  (medians of {doc['config']['repeat']})",
        "",
        "## jobs/s (latency: p50 / p99)",
        table(
            ["workload", *[systems[k].get("name", k) if k in PEERS or k == "raw" else k for k in keys]],
            [[WORKLOADS[w], *[cell(results[w].get(k), w) for k in keys]] for w in results],
        ),
        "",
        "## cost per job",
        "(CPU: producer process for enqueue rows, worker process(es) otherwise; server: INFO cpu;"
        " cmds: INFO commandstats, commands inside scripts included; mem: used_memory delta per job)",
    ]
    rows = []
    for w in results:
        for k in keys:
            r = results[w].get(k)
            if not r:
                continue
            if r.get("status") != "ok":
                rows.append([w, k, r.get("status", "?"), "", "", "", "", str(r.get("note", ""))[:90]])
                continue
            top = ", ".join(f"{c} {v:g}" for c, v in list(r.get("cmds", {}).items())[:6])
            rows.append(
                [
                    w,
                    k,
                    fmt(r.get("rate")),
                    fmt(r.get("cpu_us"), 1),
                    fmt(r.get("server_cpu_us"), 1),
                    fmt(r.get("cmds_per_job"), 2),
                    fmt(r.get("mem_per_job")),
                    top,
                ]
            )
    lines.append(
        table(
            ["workload", "system", "jobs/s", "CPU us", "server us", "cmds", "mem B", "commands per job"],
            rows,
        )
    )
    lines += ["", "## systems"]
    lines.append(
        table(
            ["system", "version", "parser", "settings", "guarantee"],
            [
                [
                    k,
                    str(systems[k].get("version", "-")),
                    str(systems[k].get("parser", "-")),
                    str(systems[k].get("settings", systems[k].get("error", "-")))[:90],
                    str(systems[k].get("guarantee", "-")),
                ]
                for k in keys
            ],
        )
    )
    lines += ["", "## goals (issue #6)"]
    goal_rows = []
    for g in doc["goals"]:
        unit = g.get("unit")
        value = g["value"]
        if value is None:
            shown = "-"
        elif unit:
            shown = f"{fmt(value, 2)} {unit}"
        else:
            shown = f"{value:.2f}x" if g["target"] and g["target"] > 1 else f"{100 * value:.1f}%"
        if g.get("versus"):
            shown += f" (vs {g['versus']})"
        verdict = {True: "met", False: "NOT met", None: "stated" if value is not None else "not measured"}
        goal_rows.append([g["goal"], shown, verdict[g["met"]]])
    lines.append(table(["goal", "measured", "verdict"], goal_rows))
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default=None, help="target this server (default: a throwaway valkey-server)")
    parser.add_argument(
        "--peers",
        nargs="?",
        const="all",
        default=None,
        help="also run the peers (all, or a comma-separated list: " + ",".join(PEERS) + ")",
    )
    parser.add_argument("--quick", action="store_true", help="small N: a smoke test, not a measurement")
    parser.add_argument("--long", action="store_true", help="RSS run over 200,000 jobs")
    parser.add_argument("--rss-jobs", type=int, default=None, help="RSS run over N jobs (e.g. 1000000)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per workload (default 3; quick 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument(
        "--hiredis",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="qflow and raw with (or without) redis-py's hiredis parser (default: whatever this python has)",
    )
    parser.add_argument("--uvloop", action="store_true", help="qflow and raw on uvloop")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run qflow with hiredis, with the pure-Python parser, and on uvloop (+hiredis), same run",
    )
    parser.add_argument(
        "--claim-behind",
        action="store_true",
        help="also run qflow with WorkerSettings(claim_behind_wait=True), same run",
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        action="append",
        help="a folder holding a patched `qflow` package, measured beside qflow (repeatable)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="measure qflow from this folder's `qflow` package (a frozen copy, e.g. from `git archive`)",
    )
    parser.add_argument("--save", type=Path, default=None, help="also write the JSON document to this file")
    parser.add_argument("--render", type=Path, default=None, help="report a saved JSON document; no run")
    parser.add_argument("--hide", default="", help="with --render: comma-separated systems to leave out")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads to run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per step (default 90; quick 30)")
    args = parser.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in args.only if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    if args.render:
        doc = json.loads(args.render.read_text())
        hidden = {h.strip() for h in args.hide.split(",") if h.strip()}
        doc["systems"] = {k: v for k, v in doc["systems"].items() if k not in hidden}
        doc["results"] = {
            w: {k: v for k, v in per.items() if k not in hidden} for w, per in doc["results"].items()
        }
        doc["goals"] = goals(doc["results"], [k for k in doc["systems"] if k in PEERS])
        print(json.dumps(doc, indent=1) if args.json else report(doc))
        return 0
    sizes = QUICK if args.quick else Sizes()
    if args.long or args.rss_jobs:
        sizes = Sizes(**{**sizes.__dict__, "rss": args.rss_jobs or 200_000})
    repeat = args.repeat or (1 if args.quick else 3)
    # SIGTERM unwinds like Ctrl-C: adapter processes are killed and the throwaway server stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    timeout = args.timeout or (30.0 if args.quick else 90.0)

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        server = Server(url, owned=args.url is None)
        stack.callback(server.close)
        log(f"server {server.version()} at {url}")
        systems = qflow_systems(args)
        if args.peers:
            systems += peer_systems(args)
        for s in systems:
            describe(s, url)
            if "error" in s.info:
                log(f"  {s.key}: {s.info['error']}")
        bench = Bench(server, sizes, timeout)
        raw_runs: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in args.only}
        for rep in range(repeat):
            for w in args.only:
                for s in systems:
                    if w not in s.workloads:
                        continue
                    if "error" in s.info:
                        result: dict[str, Any] = {"status": "error", "note": s.info["error"][:300]}
                    else:
                        t0 = time.monotonic()
                        result = bench.run(s, w)
                        log(
                            f"[{rep + 1}/{repeat}] {w:<18} {s.key:<9} {cell(result, w):>28}"
                            f"  ({time.monotonic() - t0:.1f}s) {result.get('note', '')[:200]}"
                        )
                    raw_runs[w].setdefault(s.key, []).append(result)
        results = {w: {k: combine(v) for k, v in per.items()} for w, per in raw_runs.items()}
        peers = [s.key for s in systems if s.key in PEERS]
        doc = {
            "machine": machine(),
            "server": server.version(),
            "config": {
                "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "repeat": repeat,
                "sizes": sizes.__dict__,
                "concurrency": CONCURRENCY,
            },
            "systems": {s.key: s.info for s in systems},
            "results": results,
            "goals": goals(results, peers),
        }
    if args.save:
        args.save.write_text(json.dumps(doc, indent=1))
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
