"""The ``qflow`` command line: its arguments, their ``QFLOW_*`` variables and defaults, and ``parse_args``.

Options default to None in the parser; ``parse_args`` fills what was not given from the environment, then
from the defaults, and checks the combinations argparse cannot. Every error exits with argparse's usage
message and ``ExitCode.USAGE``. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._settings import MAX_CONCURRENCY
from .control import MAX_PROCESSES
from .exitcodes import MEANING, ExitCode
from .logs import LOG_LEVELS

__all__ = ("COMMON_ENV", "JOB_STATES", "WORKER_ENV", "build_parser", "parse_args")

WORKER_DESCRIPTION = """\
Run the processors of module:app in supervised worker processes.

Two knobs, never confused:
  -c/--concurrency  jobs ONE process runs at once inside its event loop (I/O-bound work)
  -p/--processes    separate OS processes (CPU-bound work, fault isolation)
  capacity = processes x concurrency

The supervisor (this process) never imports the app: each worker process imports module:app itself,
and is restarted if it dies, killed and replaced if its event loop stops answering for --hang-timeout
seconds, and recycled after --max-jobs-per-child jobs or --max-memory-per-child MB. -p 1 is supervised
too; --in-process runs one worker in this process (for a debugger, or under systemd/Kubernetes)."""

SIGNALS_HELP = """\
signals (to the supervisor):
  SIGTERM, SIGINT   drain: stop fetching, finish jobs in flight (up to --drain-timeout), exit 0
                    a second one stops now: unfinished jobs are released back to their queue
  SIGQUIT           stop now, releasing unfinished jobs
  SIGHUP            rolling restart (new code), one process at a time, no job lost
  SIGTTIN / SIGTTOU one process more / one fewer (the removed one drains first); or `qflow scale`"""


def _exit_codes_help() -> str:
    lines = ["exit codes:"]
    lines += [f"  {int(code):<3} {code.name:<12} {MEANING[code]}" for code in ExitCode]
    return "\n".join(lines)


# -- argument types ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _process_count(text: str) -> int:
    # The same ceiling as `qflow scale` (control.MAX_PROCESSES): a typo such as -p 40000 would fork until
    # the machine falls over.
    value = _positive_int(text)
    if value > MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_PROCESSES}, got {value}")
    return value


def _concurrency(text: str) -> int:
    # The bound @processor(concurrency=) keeps (_settings.MAX_CONCURRENCY): each unit is a lane made up front.
    value = _positive_int(text)
    if value > MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_CONCURRENCY:,}, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _megabytes(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 MB, got {text!r}")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(LOG_LEVELS)})")
    return level


LOOPS = ("asyncio", "uvloop")
JOB_STATES = ("waiting", "delayed", "active", "completed", "failed", "expired")
"""States ``qflow jobs list`` reads (``qflow._inspect.JOB_LIST_STATES``; not imported: it loads redis)."""
JOB_VERBS = ("list", "show", "retry", "purge")


def _loop(text: str) -> str:
    value = text.strip().lower()
    if value not in LOOPS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOOPS)}, got {text!r}")
    return value


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def _prefix(text: str) -> str:
    if not text or "{" in text or "}" in text:
        raise argparse.ArgumentTypeError(f"invalid key prefix {text!r}: non-empty, without braces")
    return text


def _queues(text: str) -> list[str]:
    return [q for q in text.replace(",", " ").split() if q]


# dest -> (environment variable, converter, default)
WORKER_ENV: dict[str, tuple[str, Callable[[str], Any], Any]] = {
    "processes": ("QFLOW_PROCESSES", _process_count, 1),
    "concurrency": ("QFLOW_CONCURRENCY", _concurrency, None),
    "queues": ("QFLOW_QUEUES", _queues, None),
    "burst": ("QFLOW_BURST", _flag, False),
    "drain_timeout": ("QFLOW_DRAIN_TIMEOUT", _seconds, None),
    "max_jobs_per_child": ("QFLOW_MAX_JOBS_PER_CHILD", _positive_int, None),
    "max_memory_per_child": ("QFLOW_MAX_MEMORY_PER_CHILD", _megabytes, None),
    "hang_timeout": ("QFLOW_HANG_TIMEOUT", _seconds, 30.0),
    "in_process": ("QFLOW_IN_PROCESS", _flag, False),
    "loop": ("QFLOW_LOOP", _loop, "asyncio"),
}
COMMON_ENV: dict[str, tuple[str, Callable[[str], Any], Any]] = {
    "log_level": ("QFLOW_LOG_LEVEL", _log_level, "INFO"),
    "no_log_config": ("QFLOW_NO_LOG_CONFIG", _flag, False),
}


# -- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``qflow`` argument parser (options default to None: ``parse_args`` fills env vars and defaults)."""
    from .. import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        type=_log_level,
        metavar="LEVEL",
        help="DEBUG, INFO (default), WARNING, ERROR [QFLOW_LOG_LEVEL]",
    )
    common.add_argument(
        "--no-log-config",
        action="store_const",
        const=True,
        help="leave logging alone (configure it yourself) [QFLOW_NO_LOG_CONFIG]",
    )
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument(
        "target", metavar="module:app", help="where the qflow.App lives, e.g. myproject.tasks:app"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")
    # status / info / jobs read Redis; they need module:app only to know where and under which prefix.
    target_help = (
        "where the qflow.App lives (optional: without it, queues and workers are read from Redis at --url, "
        "QFLOW_REDIS_URL, REDIS_URL or the project's running embedded server)"
    )
    reader = argparse.ArgumentParser(add_help=False)
    # The same options after a jobs verb (`qflow jobs list failed --url ...`); SUPPRESS keeps a verb's
    # parser from resetting what was given before the verb.
    reader_again = argparse.ArgumentParser(add_help=False)
    for p, default in ((reader, None), (reader_again, argparse.SUPPRESS)):
        p.add_argument("--url", metavar="URL", default=default, help="the Redis to read, without module:app")
        p.add_argument(
            "--prefix",
            type=_prefix,
            metavar="PREFIX",
            default=default,
            help="the apps' key prefix, without module:app (default qflow)",
        )
    maybe_target = argparse.ArgumentParser(add_help=False)
    maybe_target.add_argument("target", metavar="module:app", nargs="?", help=target_help)
    # Before a sub-command an optional positional would take the verb: `jobs` always gets a target word,
    # '' when none was given (see _mark_missing_target).
    jobs_target = argparse.ArgumentParser(add_help=False)
    jobs_target.add_argument("target", metavar="[module:app]", help=target_help)

    parser = argparse.ArgumentParser(
        prog="qflow",
        description="qflow: an asyncio job queue over Redis.",
        epilog=_exit_codes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    w = sub.add_parser(
        "worker",
        parents=[target, common],
        help="run worker processes (supervised)",
        description=WORKER_DESCRIPTION,
        epilog=f"{SIGNALS_HELP}\n\n{_exit_codes_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    procs = w.add_mutually_exclusive_group()
    procs.add_argument(
        "-p",
        "--processes",
        type=_process_count,
        metavar="N",
        help="worker processes (default 1) [QFLOW_PROCESSES]",
    )
    procs.add_argument(
        "-w", "--workers", dest="processes", type=_process_count, metavar="N", help="same as -p"
    )
    w.add_argument(
        "-c",
        "--concurrency",
        type=_concurrency,
        metavar="N",
        help="each processor runs up to N of its jobs at once in each worker process, in place of its own "
        "concurrency= (default: each processor's own) [QFLOW_CONCURRENCY]",
    )
    w.add_argument(
        "-q",
        "--queue",
        dest="queues",
        action="extend",
        nargs="+",
        metavar="QUEUE",
        help="run only these queues (default: every queue with processors) [QFLOW_QUEUES, comma-separated]",
    )
    w.add_argument(
        "--burst", action="store_const", const=True, help="drain the queues, then exit 0 [QFLOW_BURST]"
    )
    w.add_argument(
        "--drain-timeout",
        type=_seconds,
        metavar="S",
        help="on SIGTERM, seconds jobs in flight may finish before they are released (default: the app's) "
        "[QFLOW_DRAIN_TIMEOUT]",
    )
    w.add_argument(
        "--max-jobs-per-child",
        type=_positive_int,
        metavar="N",
        help="replace a process after about N jobs (+ up to 10%% jitter) [QFLOW_MAX_JOBS_PER_CHILD]",
    )
    w.add_argument(
        "--max-memory-per-child",
        type=_megabytes,
        metavar="MB",
        help="replace a process whose resident memory passes MB [QFLOW_MAX_MEMORY_PER_CHILD]",
    )
    w.add_argument(
        "--hang-timeout",
        type=_seconds,
        metavar="S",
        help="kill and replace a process whose event loop has not answered for S seconds (default 30; "
        "0: never) [QFLOW_HANG_TIMEOUT]",
    )
    w.add_argument(
        "--loop",
        type=_loop,
        metavar="LOOP",
        help="event loop of each worker process: asyncio (default) or uvloop (pip install 'qflow[fast]'; "
        "measured 96%% -> 98%% of the ideal rate on I/O-bound jobs) [QFLOW_LOOP]",
    )
    w.add_argument(
        "--in-process",
        action="store_const",
        const=True,
        help="run one worker in this process, without a supervisor [QFLOW_IN_PROCESS]",
    )

    sub.add_parser(
        "status",
        parents=[maybe_target, reader, as_json, common],
        help="list live worker processes, fleet-wide",
    )
    i = sub.add_parser(
        "info", parents=[maybe_target, reader, as_json, common], help="per-queue counts and throughput"
    )
    i.add_argument(
        "-q", "--queue", dest="queues", action="extend", nargs="+", metavar="QUEUE", help="only these queues"
    )

    sch = sub.add_parser(
        "schedules",
        parents=[maybe_target, reader, as_json, common],
        help="repeatable jobs (cron, intervals): spec, next run, last tick, misfire policy",
    )
    sch.add_argument(
        "-q", "--queue", dest="queues", action="extend", nargs="+", metavar="QUEUE", help="only these queues"
    )
    sch.add_argument("--payloads", action="store_true", help="show each schedule's job payload too")

    j = sub.add_parser(
        "jobs", parents=[jobs_target, reader, common], help="list, inspect, retry or purge jobs"
    )
    jsub = j.add_subparsers(dest="verb", metavar="VERB", required=True)
    listing = jsub.add_parser(
        "list",
        parents=[as_json, reader_again],
        help="ids of the jobs in one state (a bounded read: --limit per queue)",
    )
    listing.add_argument("state", choices=JOB_STATES, metavar="STATE", help=", ".join(JOB_STATES))
    listing.add_argument(
        "-q", "--queue", dest="queues", action="extend", nargs="+", metavar="QUEUE", help="only these queues"
    )
    listing.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="at most N ids per queue (default 20)"
    )
    show = jsub.add_parser("show", parents=[as_json, reader_again], help="everything stored about one job")
    show.add_argument("queue", metavar="QUEUE")
    show.add_argument("job_id", metavar="ID")
    retry = jsub.add_parser(
        "retry", parents=[as_json, reader_again], help="put failed jobs back in their queue"
    )
    retry.add_argument("queue", metavar="QUEUE")
    retry.add_argument("job_ids", metavar="ID", nargs="*", help="failed jobs to retry")
    retry.add_argument("--all-failed", action="store_true", help="retry every failed job of QUEUE")
    purge = jsub.add_parser("purge", parents=[reader_again], help="delete every job of a queue (asks first)")
    purge.add_argument("queue", metavar="QUEUE")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask (required without a terminal)")

    s = sub.add_parser(
        "scale",
        parents=[as_json, common],
        help="change the number of processes of a running `qflow worker`",
        description="Talk to a running supervisor on this host through its control socket "
        "(in QFLOW_RUN_DIR, $XDG_RUNTIME_DIR/qflow or <tmp>/qflow-<uid>).",
    )
    s.add_argument("which", metavar="module:app|PID", help="the supervisor: its target, or its pid")
    s.add_argument("count", metavar="N", nargs="?", help="processes wanted: N, +K or -K (none: show them)")
    s.add_argument("--wait", action="store_true", help="return once the count is reached (up to 60 s)")

    srv = sub.add_parser(
        "server",
        parents=[as_json, common],
        help="the project's embedded Valkey server (used when no Redis URL is configured)",
        description="Show, start or stop the embedded server of this project: data and unix socket under "
        "QFLOW_HOME or ./.qflow. Stopping writes its AOF first; the next process that needs it starts it.",
    )
    srv.add_argument("action", choices=["status", "start", "stop"], help="what to do")
    srv.add_argument(
        "--home", metavar="DIR", help="the project's qflow directory (default: QFLOW_HOME or ./.qflow)"
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``; options not given fall back to their ``QFLOW_*`` variable, then to their default.

    Errors (also in an environment variable) exit with argparse's usage message and ``ExitCode.USAGE``.
    """
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(_mark_missing_target(list(sys.argv[1:] if argv is None else argv)))
    if getattr(args, "target", None) == "":
        args.target = None
    table = {**COMMON_ENV, **(WORKER_ENV if args.command == "worker" else {})}
    sub = _subparser(parser, args.command)
    for dest, (var, convert, default) in table.items():
        if getattr(args, dest, None) is not None:
            continue
        raw = env.get(var)
        if raw is None:
            setattr(args, dest, default)
            continue
        try:
            setattr(args, dest, convert(raw))
        except argparse.ArgumentTypeError as exc:
            sub.error(f"environment variable {var}={raw!r}: {exc}")
    if args.command == "worker" and args.in_process and args.processes > 1:
        sub.error("--in-process runs one worker: drop -p/-w or --in-process")
    if args.command == "jobs" and args.verb == "retry" and bool(args.job_ids) == bool(args.all_failed):
        sub.error("jobs retry: give job ids or --all-failed (not both)")
    if args.command in ("status", "info", "jobs", "schedules") and args.target and (args.url or args.prefix):
        sub.error("--url and --prefix are for use without module:app (the app names its server and prefix)")
    return args


def _mark_missing_target(argv: list[str]) -> list[str]:
    """``qflow jobs list failed`` -> ``qflow jobs '' list failed``: an empty target stands for "none".

    argparse cannot tell an optional positional from the sub-command after it (it would take the verb for
    ``module:app``, or, with an option in between, ``module:app`` for the verb), so ``jobs`` always gets a
    target word. A verb never contains ':', so it cannot be a target.
    """
    if next((word for word in argv if not word.startswith("-")), None) != "jobs":
        return argv
    with_value = {"--log-level", "--url", "--prefix"}  # options of `jobs` that take the next word
    skip = False
    for j in range(argv.index("jobs") + 1, len(argv)):
        word = argv[j]
        if skip:
            skip = False
        elif word in with_value:
            skip = True
        elif not word.startswith("-"):
            return [*argv[:j], "", *argv[j:]] if word in JOB_VERBS else argv
    return argv


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return parser
