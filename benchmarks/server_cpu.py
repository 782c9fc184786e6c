"""Redis server CPU per job of the hot scripts (add, claim, complete) alone, for one or more ``lua/`` folders.

    python benchmarks/server_cpu.py                                   # this checkout's qflow/_broker/lua
    python benchmarks/server_cpu.py --lua /tmp/base/qflow/_broker/lua --lua qflow/_broker/lua   # compare

benchmarks/run.py measures whole systems (a worker's own round trips included); this drives the three
scripts directly, with no worker, so a change to a script shows up undiluted (issue #6); the scripts' KEYS
come from the broker (``qflow._broker.scripts.KEYS``), so the folders compared must take the same KEYS.
Per phase, per job:

- ``script us``: ``INFO commandstats`` time inside EVALSHA (the script and the commands it calls; no I/O);
- ``server us``: ``INFO cpu`` (user + sys) of the whole server, I/O included;
- ``calls``: commands the scripts called (``INFO commandstats``, EVALSHA itself left out).

Phases: ``add_one`` (one add per call, pipelined), ``add_bulk`` (500 jobs per call), ``claim`` and
``complete`` (``--batch`` jobs per call). The folders take turns in each repeat, on fresh keys; medians shown.
Without ``--url`` a throwaway valkey-server is started.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from qflow._broker.evalsha import expand_source
from qflow._broker.keys import SCHEMA_VERSION, QueueKeys
from qflow._broker.scripts import KEYS, unpack_claimed
from qflow.testing import local_server

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("add_one", "add_bulk", "claim", "complete")


def counters(r: redis.Redis) -> tuple[float, dict[str, tuple[int, int]]]:
    """Server CPU seconds so far, and (calls, usec) per command."""
    cpu = r.info("cpu")
    stats = r.info("commandstats")
    per = {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), per


@contextlib.contextmanager
def measure(r: redis.Redis, jobs: int, out: dict[str, float]) -> Iterator[None]:
    """Fill ``out`` with script us, server us and inner calls per job for the block's commands."""
    cpu0, per0 = counters(r)
    yield
    cpu1, per1 = counters(r)
    delta = {k: (v[0] - per0.get(k, (0, 0))[0], v[1] - per0.get(k, (0, 0))[1]) for k, v in per1.items()}
    out["script_us"] = delta.get("evalsha", (0, 0))[1] / jobs
    out["server_us"] = (cpu1 - cpu0) * 1e6 / jobs
    # INFO itself and EVALSHA are not calls made by the scripts.
    out["calls"] = sum(c for k, (c, _) in delta.items() if k not in ("evalsha", "info")) / jobs


def run_once(
    r: redis.Redis, lua_dir: Path, n: int, batch: int, envelope: bytes
) -> dict[str, dict[str, float]]:
    """Every phase once on a fresh queue; returns the figures per phase."""
    k = QueueKeys(f"cpubench-{uuid.uuid4().hex[:8]}", "q")
    add = r.register_script(expand_source(lua_dir, "add"))
    claim = r.register_script(expand_source(lua_dir, "claim"))
    complete = r.register_script(expand_source(lua_dir, "complete"))
    for s in (add, claim, complete):
        r.script_load(s.script)
    add_keys = KEYS["add"](k)
    claim_keys = KEYS["claim"](k)
    complete_keys = list(KEYS["complete"](k))
    res: dict[str, dict[str, float]] = {p: {} for p in PHASES}
    try:
        with measure(r, n, res["add_one"]):
            pipe = r.pipeline(transaction=False)
            for i in range(n):
                add(keys=add_keys, args=[SCHEMA_VERSION, f"a{i}", envelope, 0, 0], client=pipe)
                if len(pipe) == 100:
                    pipe.execute()
            pipe.execute()
        with measure(r, n, res["add_bulk"]):
            for start in range(0, n, 500):
                argv: list[Any] = [SCHEMA_VERSION]
                for i in range(start, min(start + 500, n)):
                    argv += [f"b{i}", envelope, 0, 0]
                add(keys=add_keys, args=argv)
        held: list[tuple[bytes, bytes]] = []
        with measure(r, 2 * n, res["claim"]):
            while True:
                # A worker's claim: a fetcher id, no slot kept free, a 2 s wait (older scripts ignore them).
                argv = [batch, 30_000, 1000, 1 << 20, b"too large", "bench", 0, 2000]
                packed = claim(keys=claim_keys, args=argv)[2]
                if not packed:
                    break
                held += [(job.id, job.token) for job in unpack_claimed(packed)]
        with measure(r, len(held), res["complete"]):
            for start in range(0, len(held), batch):
                part = held[start : start + batch]
                argv = [1_000_000, -1, 60_000]
                for job_id, token in part:
                    argv += [job_id, token, b"\x00"]
                flags = complete(keys=complete_keys + [k.notify_raw(i) for i, _ in part], args=argv)
                assert flags == b"1" * len(part), flags
    finally:
        for key in k.all_fixed():
            r.delete(key)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="target this server (default: a throwaway valkey-server)")
    parser.add_argument("--lua", action="append", type=Path, help="a lua/ folder (repeatable; default: ours)")
    parser.add_argument("-n", type=int, default=20_000, help="jobs per phase (default 20,000)")
    parser.add_argument("--batch", type=int, default=100, help="jobs per claim and per complete call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--envelope", type=int, default=40, help="envelope bytes per job")
    args = parser.parse_args()
    dirs = args.lua or [ROOT / "qflow" / "_broker" / "lua"]
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        r = redis.Redis.from_url(url, socket_timeout=60)
        runs: dict[Path, list[dict[str, dict[str, float]]]] = {d: [] for d in dirs}
        for _ in range(args.repeat):
            for d in dirs:  # taking turns: drift on the box hits every folder alike
                runs[d].append(run_once(r, d, args.n, args.batch, b"e" * args.envelope))
        print(f"server {r.info('server').get('valkey_version') or r.info('server')['redis_version']}; "
              f"n={args.n}, batch={args.batch}, medians of {args.repeat}")  # fmt: skip
        print(f"| {'lua folder':<40} | {'phase':<8} | script us | server us | calls/job |")
        print(f"| {'-' * 40} | {'-' * 8} | --------- | --------- | --------- |")
        for d in dirs:
            for p in PHASES:
                med = {
                    m: statistics.median(x[p][m] for x in runs[d])
                    for m in ("script_us", "server_us", "calls")
                }
                print(
                    f"| {str(d)[-40:]:<40} | {p:<8} | {med['script_us']:9.2f} | {med['server_us']:9.2f} "
                    f"| {med['calls']:9.2f} |"
                )


if __name__ == "__main__":
    main()
