"""The read-outs of ``qflow``: status (worker processes), info (per-queue counts), jobs list|show|retry|purge,
schedules (repeatable jobs).

Each loads the app, or without ``module:app`` reads the fleet and the queues straight from Redis (``--url``,
``QFLOW_REDIS_URL``, ``REDIS_URL``, else the project's embedded server if it runs), prints a table or
``--json`` through ``output``, and returns an ``ExitCode``; ``main`` parses and dispatches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .exitcodes import ExitCode
from .output import ago, err, fail, indent, out, print_json, table, when

__all__ = ("cmd_info", "cmd_jobs", "cmd_schedules", "cmd_status")


def _one_shot(args: argparse.Namespace, body: Callable[[Any], Any]) -> ExitCode:
    """Load the app (or, without ``module:app``, make a bare one on the configured server), run ``body(app)``
    in an event loop, map qflow errors to exit codes."""
    from ..exceptions import BrokerError, BrokerFull, BrokerUnavailable, ConfigurationError, JobNotFound
    from .importer import BadTarget, load_app

    if args.target:
        try:
            app = load_app(args.target)
        except BadTarget as exc:
            if exc.details:
                err(exc.details)
            return fail(ExitCode.BAD_TARGET, str(exc))
    else:
        try:
            found = _app_from_redis(args)
        except ConfigurationError as exc:
            return fail(ExitCode.CONFIG, str(exc))
        if isinstance(found, ExitCode):
            return found
        app = found

    async def run() -> ExitCode:
        try:
            result: ExitCode = await body(app)
            return result
        finally:
            await app.close()

    try:
        return asyncio.run(run())
    except ConfigurationError as exc:
        return fail(ExitCode.CONFIG, str(exc))
    except (BrokerUnavailable, BrokerFull) as exc:
        return fail(ExitCode.UNAVAILABLE, str(exc))
    except BrokerError as exc:
        # Refused credentials or permissions, another schema, a corrupt key: retrying will not help.
        return fail(ExitCode.CONFIG, str(exc))
    except JobNotFound as exc:
        return fail(ExitCode.NOT_FOUND, str(exc))


def _app_from_redis(args: argparse.Namespace) -> Any:
    """A bare ``App`` (no queues declared) on ``--url``, else the variables, else the embedded server.

    The embedded server is used only if it already runs: starting one to inspect it would show nothing.
    Returns an ``ExitCode`` (after saying why) when there is nothing to read.
    """
    from .. import _embedded
    from .._app import App

    url = args.url or next(
        (os.environ[v] for v in ("QFLOW_REDIS_URL", "REDIS_URL") if os.environ.get(v)), None
    )
    if url is None:
        if _embedded.embedded_disabled():
            return fail(
                ExitCode.CONFIG,
                "no Redis to read: give module:app or --url URL, or set QFLOW_REDIS_URL "
                "(QFLOW_EMBEDDED=0 turned the embedded server off)",
            )
        server = _embedded.server_for()
        if not server.answers():
            return fail(
                ExitCode.UNAVAILABLE,
                f"no Redis to read: no module:app, --url, QFLOW_REDIS_URL or REDIS_URL, and this project's "
                f"embedded server is not running (data in {server.home}); start a worker or a producer, "
                "`qflow server start`, or give --url",
            )
    return App(url, prefix=args.prefix or "qflow")


def _where(args: argparse.Namespace, app: Any) -> str:
    """Where the command looked, for "found nothing" messages."""
    return f"in {args.target}" if args.target else f"under prefix {app.prefix!r}"


async def _queues_of(args: argparse.Namespace, app: Any, names: Sequence[str] | None) -> list[Any]:
    """The queues a command reads: ``names`` (-q), else the app's declared queues, else those found in Redis.

    With ``module:app``, a name the app does not declare is a ``ConfigurationError``; without it, a name
    Redis does not know is one too (a typo would otherwise print an empty queue).
    """
    from .._inspect import discover_queues
    from ..exceptions import ConfigurationError

    known = list(app.queues) if args.target else await discover_queues(app)
    if not names:
        return [app.queue(q) for q in known]
    unknown = [q for q in names if q not in known]
    if unknown:
        found = f"; found: {', '.join(known)}" if known and not args.target else ""
        raise ConfigurationError(f"no queue named {', '.join(map(repr, unknown))} {_where(args, app)}{found}")
    return [app.queue(q) for q in names]


def cmd_status(args: argparse.Namespace) -> ExitCode:
    """``qflow status``: every live worker process of the app's Redis, on every host."""
    from .._inspect import list_workers, server_time

    async def body(app: Any) -> ExitCode:
        workers = await list_workers(app)
        if args.json:
            print_json(workers)
            return ExitCode.OK
        now = await server_time(app)
        if not workers:
            out(f"no live worker process (prefix {app.prefix!r})")
            return ExitCode.OK
        rows = [
            (
                w.name,
                w.host,
                w.pid,
                w.supervisor_pid or "-",
                ",".join(w.queues),
                w.concurrency,
                w.running,
                w.claimed_ahead,
                w.jobs_done,
                w.state,
                ago(now - w.started_at),
                ago(now - w.last_seen) + " ago",
            )
            for w in workers
        ]
        heads = (
            "NAME",
            "HOST",
            "PID",
            "SUPERVISOR",
            "QUEUES",
            "CONC",
            "RUNNING",
            "AHEAD",
            "DONE",
            "STATE",
            "UPTIME",
            "SEEN",
        )
        out(table(heads, rows, right=(2, 3, 5, 6, 7, 8)))
        hosts = len({w.host for w in workers})
        out(
            f"\n{len(workers)} worker process(es) on {hosts} host(s): {sum(w.concurrency for w in workers)} "
            f"slots, {sum(w.running for w in workers)} running, {sum(w.claimed_ahead for w in workers)} "
            "claimed ahead"
        )
        out(
            "RUNNING: handlers running now (at most CONC); AHEAD: claimed ahead, waiting for a free lane "
            "(by each worker's last heartbeat)"
        )
        return ExitCode.OK

    return _one_shot(args, body)


def cmd_info(args: argparse.Namespace) -> ExitCode:
    """``qflow info``: per-queue counts, lifetime totals and throughput over the last minute."""
    from .._inspect import queue_info

    async def body(app: Any) -> ExitCode:
        infos = await queue_info(app, await _queues_of(args, app, args.queues))
        if args.json:
            print_json(infos)
            return ExitCode.OK
        if not infos:
            out(f"no queue {_where(args, app)} (no job was ever added to one)")
            return ExitCode.OK
        rows = [
            (
                q.queue,
                q.waiting,
                q.active,
                q.running,
                q.claimed_ahead,
                q.delayed,
                q.completed,
                q.failed,
                q.expired,
                q.workers,
                q.concurrency,
                f"{q.completed_per_s:.2f}",
                f"{q.failed_per_s:.2f}",
            )
            for q in infos
        ]
        heads = (
            "QUEUE",
            "WAITING",
            "ACTIVE",
            "RUNNING",
            "AHEAD",
            "DELAYED",
            "COMPLETED",
            "FAILED",
            "EXPIRED",
            "WORKERS",
            "CONC",
            "DONE/S",
            "FAILED/S",
        )
        out(table(heads, rows, right=tuple(range(1, 13))))
        window = min((q.window_s for q in infos), default=60.0)
        out(
            "\nACTIVE: jobs leased to workers: RUNNING (handlers running now, at most CONC), AHEAD (claimed "
            "ahead,\nwaiting for a free lane; both by the workers' last heartbeats) and acks on their way"
        )
        out(
            f"rates over the last {window:.0f}s (server clock); COMPLETED/FAILED/EXPIRED: jobs kept by "
            "retention"
        )
        return ExitCode.OK

    return _one_shot(args, body)


def cmd_jobs(args: argparse.Namespace) -> ExitCode:
    """``qflow jobs list|show|retry|purge``."""
    from .._inspect import list_jobs
    from ..exceptions import ConfigurationError

    def queue_of(app: Any) -> Any:
        from .._broker.keys import check_queue_name

        try:
            check_queue_name(args.queue)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return app.queues.get(args.queue) or app.queue(args.queue)

    async def listing(app: Any) -> ExitCode:
        lists = [await list_jobs(q, args.state, args.limit) for q in await _queues_of(args, app, args.queues)]
        if args.json:
            print_json(lists)
            return ExitCode.OK
        if not lists:
            out(f"no queue {_where(args, app)} (no job was ever added to one)")
        column = {
            "delayed": "DUE",
            "active": "LEASE UNTIL",
            "completed": "FINISHED",
            "failed": "FAILED AT",
            "expired": "EXPIRED AT",
        }
        for jl in lists:
            shown = f"{len(jl.jobs)} of {jl.total}" if len(jl.jobs) < jl.total else f"{jl.total}"
            out(f"{jl.state} jobs of queue {jl.queue!r}: {shown} ({jl.order})")
            if jl.state == "waiting":
                rows: list[tuple[str, ...]] = [(j.id,) for j in jl.jobs]
                heads: tuple[str, ...] = ("ID",)
            else:
                rows = [(j.id, when(j.at)) for j in jl.jobs]
                heads = ("ID", column[jl.state])
            if rows:
                out(indent(table(heads, rows)))
        if any(len(jl.jobs) < jl.total for jl in lists):
            out(f"(at most {args.limit} per queue: --limit N for more)")
        return ExitCode.OK

    async def show(app: Any) -> ExitCode:
        info = await queue_of(app).get_job(args.job_id)
        if args.json:
            print_json(info)
            return ExitCode.OK
        out(f"job {info.id} in queue {info.queue}: {info.state}")
        out(f"  name      {info.name}")
        out(f"  payload   {msgspec.json.encode(info.payload, enc_hook=repr).decode()}")
        out(f"  attempts  {info.attempts_spent} spent, {info.stalls} stall(s)")
        if info.options:
            out(f"  options   {msgspec.json.encode(info.options, enc_hook=repr).decode()}")
        if info.since is not None:
            out(f"  since     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.since))}")
        if info.state == "completed":
            out(f"  result    {msgspec.json.encode(info.result, enc_hook=repr).decode()}")
        if info.error:
            out(f"  error     {info.error['type']}: {info.error['message']} ({info.error.get('kind', '')})")
            if info.error.get("traceback"):
                out("\n" + info.error["traceback"].rstrip())
        return ExitCode.OK

    async def retry(app: Any) -> ExitCode:
        report = await queue_of(app).retry_failed(None if args.all_failed else args.job_ids)
        counts = {
            "requeued": report.requeued,
            "not_failed": len(report.not_failed),
            "missing": len(report.missing),
        }
        if args.json:
            print_json(counts)
        else:
            out(
                f"requeued {counts['requeued']} job(s) of {args.queue}"
                + (f"; {counts['not_failed']} not failed (left alone)" if counts["not_failed"] else "")
                + (f"; {counts['missing']} not found" if counts["missing"] else "")
            )
        return ExitCode.NOT_FOUND if counts["missing"] else ExitCode.OK

    async def purge(app: Any) -> ExitCode:
        queue = queue_of(app)
        counts = await queue.counts()
        summary = ", ".join(f"{n} {state}" for state, n in counts.items())
        if not args.yes:
            if not sys.stdin or not sys.stdin.isatty():
                return fail(
                    ExitCode.USAGE,
                    f"refusing to purge queue {args.queue!r} without --yes: no terminal to confirm on",
                )
            answer = await asyncio.to_thread(
                input, f"Delete every job of queue {args.queue!r} ({summary}) and its counters? [y/N] "
            )
            if answer.strip().lower() not in ("y", "yes"):
                out("aborted: nothing deleted")
                return ExitCode.ERROR
        deleted = await queue.purge()
        out(f"purged queue {args.queue!r} ({summary}; {deleted} key(s) deleted)")
        return ExitCode.OK

    verbs: dict[str, Callable[[Any], Any]] = {"list": listing, "show": show, "retry": retry, "purge": purge}
    return _one_shot(args, verbs[args.verb])


def cmd_schedules(args: argparse.Namespace) -> ExitCode:
    """``qflow schedules``: every repeatable job of the queues, with its next run (server clock)."""
    from .._inspect import server_time
    from .._schedule import list_schedules

    async def body(app: Any) -> ExitCode:
        found = [
            s
            for q in await _queues_of(args, app, args.queues)
            for s in await list_schedules(q, payloads=args.payloads)
        ]
        if args.json:
            print_json(found)
            return ExitCode.OK
        if not found:
            out(f"no schedule {_where(args, app)}")
            return ExitCode.OK
        now = await server_time(app)
        rows = []
        for s in found:
            if s.next_run is None:
                next_run = "- (no more ticks)"
            else:
                late = now - s.next_run
                due = f" (due {ago(late)} ago)" if late > 0 else f" (in {ago(-late)})"
                next_run = when(s.next_run) + due
            misfire = s.misfire if s.misfire == "run_once" else f"skip (grace {s.misfire_grace:g}s)"
            last = when(s.last_tick)
            row = [s.queue, s.id, s.name, s.describe(), next_run, last, s.fired, s.missed, misfire]
            if args.payloads:
                row.append(msgspec.json.encode(s.payload, enc_hook=repr).decode())
            rows.append(tuple(row))
        heads = ["QUEUE", "ID", "JOB", "SPEC", "NEXT RUN", "LAST TICK", "FIRED", "MISSED", "MISFIRE"]
        if args.payloads:
            heads.append("PAYLOAD")
        out(table(heads, rows, right=(6, 7)))
        out(
            "\nTimes are local, read from the Redis server's clock. FIRED: jobs created; MISSED: ticks that "
            "got no job\n(due while no worker process ran the queue, or dropped by misfire=skip)"
        )
        return ExitCode.OK

    return _one_shot(args, body)
