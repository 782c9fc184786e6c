"""The one-shot operator commands of ``qflow``: status, info, jobs list|show|retry|purge, scale.

Each loads the app (``status``, ``info``, ``jobs``) or talks to a supervisor's control socket (``scale``),
prints a table or ``--json``, and returns an ``ExitCode``; ``qflow._cli`` parses and dispatches. Without
``module:app``, ``status``, ``info`` and ``jobs`` read the fleet and the queues straight from Redis
(``--url``, ``QFLOW_REDIS_URL``, ``REDIS_URL``, else the project's embedded server if it runs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ._exitcodes import ExitCode

__all__ = ("cmd_info", "cmd_jobs", "cmd_scale", "cmd_status", "fail")


def _out(text: str) -> None:
    """One line (or block) of a command's output, on stdout."""
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")


def fail(code: ExitCode, message: str) -> ExitCode:
    """Print ``qflow: error: message`` on stderr and return ``code``."""
    _err(f"qflow: error: {message}")
    return code


def _one_shot(args: argparse.Namespace, body: Callable[[Any], Any]) -> ExitCode:
    """Load the app (or, without ``module:app``, make a bare one on the configured server), run ``body(app)``
    in an event loop, map qflow errors to exit codes."""
    from ._importer import BadTarget, load_app
    from .exceptions import BrokerUnavailable, ConfigurationError, JobNotFound

    if args.target:
        try:
            app = load_app(args.target)
        except BadTarget as exc:
            if exc.details:
                _err(exc.details)
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
    except BrokerUnavailable as exc:
        return fail(ExitCode.UNAVAILABLE, str(exc))
    except JobNotFound as exc:
        return fail(ExitCode.NOT_FOUND, str(exc))


def _app_from_redis(args: argparse.Namespace) -> Any:
    """A bare ``App`` (no queues declared) on ``--url``, else the variables, else the embedded server.

    The embedded server is used only if it already runs: starting one to inspect it would show nothing.
    Returns an ``ExitCode`` (after saying why) when there is nothing to read.
    """
    from . import _embedded
    from ._app import App

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
    from ._fleet import discover_queues
    from .exceptions import ConfigurationError

    known = list(app.queues) if args.target else await discover_queues(app)
    if not names:
        return [app.queue(q) for q in known]
    unknown = [q for q in names if q not in known]
    if unknown:
        found = f"; found: {', '.join(known)}" if known and not args.target else ""
        raise ConfigurationError(f"no queue named {', '.join(map(repr, unknown))} {_where(args, app)}{found}")
    return [app.queue(q) for q in names]


def _print_json(data: Any) -> None:
    _out(msgspec.json.format(msgspec.json.encode(data, enc_hook=repr), indent=2).decode())


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Plain aligned columns (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _when(at: float | None) -> str:
    """Server time (Unix seconds) as local date and time, to the millisecond."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def cmd_status(args: argparse.Namespace) -> ExitCode:
    """``qflow status``: every live worker process of the app's Redis, on every host."""
    from ._fleet import _server_ms, list_workers

    async def body(app: Any) -> ExitCode:
        workers = await list_workers(app)
        if args.json:
            _print_json(workers)
            return ExitCode.OK
        now = await _server_ms(app.redis()) / 1000
        if not workers:
            _out(f"no live worker process (prefix {app.prefix!r})")
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
                _ago(now - w.started_at),
                _ago(now - w.last_seen) + " ago",
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
        _out(_table(heads, rows, right=(2, 3, 5, 6, 7, 8)))
        hosts = len({w.host for w in workers})
        _out(
            f"\n{len(workers)} worker process(es) on {hosts} host(s): {sum(w.concurrency for w in workers)} "
            f"slots, {sum(w.running for w in workers)} running, {sum(w.claimed_ahead for w in workers)} "
            "claimed ahead"
        )
        _out(
            "RUNNING: handlers running now (at most CONC); AHEAD: claimed ahead, waiting for a free lane "
            "(by each worker's last heartbeat)"
        )
        return ExitCode.OK

    return _one_shot(args, body)


def cmd_info(args: argparse.Namespace) -> ExitCode:
    """``qflow info``: per-queue counts, lifetime totals and throughput over the last minute."""
    from ._fleet import queue_info

    async def body(app: Any) -> ExitCode:
        infos = await queue_info(app, await _queues_of(args, app, args.queues))
        if args.json:
            _print_json(infos)
            return ExitCode.OK
        if not infos:
            _out(f"no queue {_where(args, app)} (no job was ever added to one)")
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
            "WORKERS",
            "CONC",
            "DONE/S",
            "FAILED/S",
        )
        _out(_table(heads, rows, right=tuple(range(1, 12))))
        window = min((q.window_s for q in infos), default=60.0)
        _out(
            "\nACTIVE: jobs leased to workers: RUNNING (handlers running now, at most CONC), AHEAD (claimed "
            "ahead,\nwaiting for a free lane; both by the workers' last heartbeats) and acks on their way"
        )
        _out(f"rates over the last {window:.0f}s (server clock); COMPLETED/FAILED: jobs kept by retention")
        return ExitCode.OK

    return _one_shot(args, body)


def cmd_jobs(args: argparse.Namespace) -> ExitCode:
    """``qflow jobs list|show|retry|purge``."""
    from ._fleet import list_jobs, retry_failed, show_job
    from .exceptions import ConfigurationError

    def queue_of(app: Any) -> Any:
        from ._keys import check_queue_name

        try:
            check_queue_name(args.queue)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        return app.queues.get(args.queue) or app.queue(args.queue)

    async def listing(app: Any) -> ExitCode:
        lists = [await list_jobs(q, args.state, args.limit) for q in await _queues_of(args, app, args.queues)]
        if args.json:
            _print_json(lists)
            return ExitCode.OK
        if not lists:
            _out(f"no queue {_where(args, app)} (no job was ever added to one)")
        when = {"delayed": "DUE", "active": "LEASE UNTIL", "completed": "FINISHED", "failed": "FAILED AT"}
        for jl in lists:
            shown = f"{len(jl.jobs)} of {jl.total}" if len(jl.jobs) < jl.total else f"{jl.total}"
            _out(f"{jl.state} jobs of queue {jl.queue!r}: {shown} ({jl.order})")
            if jl.state == "waiting":
                rows: list[tuple[str, ...]] = [(j.id,) for j in jl.jobs]
                heads: tuple[str, ...] = ("ID",)
            else:
                rows = [(j.id, _when(j.at)) for j in jl.jobs]
                heads = ("ID", when[jl.state])
            if rows:
                _out(_indent(_table(heads, rows)))
        if any(len(jl.jobs) < jl.total for jl in lists):
            _out(f"(at most {args.limit} per queue: --limit N for more)")
        return ExitCode.OK

    async def show(app: Any) -> ExitCode:
        info = await show_job(queue_of(app), args.job_id)
        if args.json:
            _print_json(info)
            return ExitCode.OK
        _out(f"job {info.id} in queue {info.queue}: {info.state}")
        _out(f"  name      {info.name}")
        _out(f"  payload   {msgspec.json.encode(info.payload, enc_hook=repr).decode()}")
        _out(f"  attempts  {info.attempts_spent} spent, {info.stalls} stall(s)")
        if info.options:
            _out(f"  options   {msgspec.json.encode(info.options, enc_hook=repr).decode()}")
        if info.since is not None:
            _out(f"  since     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.since))}")
        if info.state == "completed":
            _out(f"  result    {msgspec.json.encode(info.result, enc_hook=repr).decode()}")
        if info.error:
            _out(f"  error     {info.error['type']}: {info.error['message']} ({info.error.get('kind', '')})")
            if info.error.get("traceback"):
                _out("\n" + info.error["traceback"].rstrip())
        return ExitCode.OK

    async def retry(app: Any) -> ExitCode:
        counts = await retry_failed(queue_of(app), None if args.all_failed else args.job_ids)
        if args.json:
            _print_json(counts)
        else:
            _out(
                f"requeued {counts['requeued']} job(s) of {args.queue}"
                + (f"; {counts['not_failed']} not failed (left alone)" if counts["not_failed"] else "")
                + (f"; {counts['missing']} not found" if counts["missing"] else "")
            )
        return ExitCode.NOT_FOUND if counts["missing"] else ExitCode.OK

    async def purge(app: Any) -> ExitCode:
        from .testing import purge as purge_queue

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
                _out("aborted: nothing deleted")
                return ExitCode.ERROR
        deleted = await purge_queue(queue)
        _out(f"purged queue {args.queue!r} ({summary}; {deleted} key(s) deleted)")
        return ExitCode.OK

    verbs: dict[str, Callable[[Any], Any]] = {"list": listing, "show": show, "retry": retry, "purge": purge}
    return _one_shot(args, verbs[args.verb])


def cmd_scale(args: argparse.Namespace) -> ExitCode:
    """``qflow scale``: show or change the process count of running supervisors on this host."""
    from ._control import control_request, find_supervisors, run_dir
    from ._importer import BadTarget, split_target

    directory = run_dir()
    if args.which.isdigit():
        path = directory / f"qflow-{args.which}.sock"
        if not path.exists():
            return fail(ExitCode.NOT_FOUND, f"no supervisor with pid {args.which} (no {path})")
        matches = [path]
    else:
        try:
            split_target(args.which)
        except BadTarget as exc:
            return fail(ExitCode.USAGE, str(exc))
        matches = [p for p, status in find_supervisors(directory) if status.get("target") == args.which]
        if not matches:
            return fail(
                ExitCode.NOT_FOUND,
                f"no running `qflow worker {args.which}` on this host (looked in {directory})",
            )
        if len(matches) > 1 and args.count is not None:
            pids = ", ".join(p.stem.removeprefix("qflow-") for p in matches)
            return fail(ExitCode.USAGE, f"several supervisors run {args.which} (pids {pids}): give a pid")
    request: dict[str, Any] = {"cmd": "status"}
    if args.count is not None:
        text = args.count.strip()
        try:
            if text[:1] in "+-":
                request = {"cmd": "scale", "delta": int(text)}
            else:
                request = {"cmd": "scale", "n": int(text)}
            if request.get("n", 1) < 1:
                raise ValueError(text)
        except ValueError:
            return fail(ExitCode.USAGE, f"N must be a count >= 1, +K or -K, got {args.count!r}")
    replies = []
    for path in matches:
        try:
            reply = control_request(path, request)
            if args.wait and request["cmd"] == "scale":
                reply = _wait_scaled(path, reply)
        except (OSError, ValueError) as exc:
            return fail(ExitCode.NOT_FOUND, f"cannot reach the supervisor at {path}: {exc}")
        replies.append(reply)
    if args.json:
        _print_json(replies)
        return ExitCode.OK
    for reply in replies:
        kids = reply["children"]
        _out(
            f"supervisor {reply['pid']} ({reply['target']}): {reply['desired']} process(es) wanted, "
            f"{len(kids)} running"
        )
        for c in kids:
            ready = "ready" if c["ready"] else "starting"
            _out(f"  {c['name']:<12} pid {c['pid']:<8} {c['state']:<10} {ready}")
    return ExitCode.OK


def _wait_scaled(path: Path, reply: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Poll the supervisor until exactly ``desired`` ready children run and none is draining."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = reply["children"]
        ready = [c for c in kids if c["state"] == "active" and c["ready"]]
        if len(ready) == reply["desired"] and len(kids) == len(ready):
            return reply
        time.sleep(0.05)
        reply = _control(path)
    return reply


def _control(path: Path) -> dict[str, Any]:
    from ._control import control_request

    return control_request(path, {"cmd": "status"})


def cmd_server(args: argparse.Namespace) -> ExitCode:
    """``qflow server status|start|stop``: the project's embedded Valkey server, and why that one."""
    import dataclasses

    from . import _embedded

    server = _embedded.server_for(args.home)
    if args.home:
        server = dataclasses.replace(server, reason="given by --home")
    if args.action == "start":
        started = _embedded.ensure_running(server)
    elif args.action == "stop":
        was_running = _embedded.stop(server)
        if args.json:
            _print_json({"home": str(server.home), "reason": server.reason, "stopped": was_running})
        else:
            sys.stdout.write(
                f"{'stopped' if was_running else 'not running'} (data in {server.home}: {server.reason})\n"
            )
        return ExitCode.OK
    pid = server.pid()
    running = pid is not None and server.answers()
    info = {
        "home": str(server.home),
        "reason": server.reason,
        "socket": str(server.socket),
        "url": server.url,
        "pid": pid,
        "running": running,
        "started_now": args.action == "start" and started,
    }
    if args.json:
        _print_json(info)
    else:
        state = f"running, pid {pid}" if running else "not running"
        sys.stdout.write(
            f"embedded Valkey: {state}\n  data:   {server.home}\n  why:    {server.reason}\n"
            f"  socket: {server.socket}\n"
        )
    return ExitCode.OK if running else ExitCode.NOT_FOUND
