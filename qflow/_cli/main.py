"""The ``qflow`` command (also ``python -m qflow``): parse, configure logging, dispatch, exit.

A thin layer over the public functions: the parser is in ``parser``, the one-shot commands in ``commands``,
``scale`` and ``server``, and ``qflow worker`` (here) hands over to the ``supervisor`` or runs one ``child``
in this process. Logging is configured here and nowhere else (``--no-log-config`` leaves it alone). Every
exit status comes from ``exitcodes.ExitCode``. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .exitcodes import ExitCode
from .logs import configure_logging
from .parser import parse_args

__all__ = ("cmd_worker", "main")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``qflow`` console script and of ``python -m qflow``."""
    args = parse_args(argv)
    if not args.no_log_config:
        configure_logging(
            args.log_level, "supervisor" if args.command == "worker" and not args.in_process else "qflow"
        )
    from .commands import cmd_info, cmd_jobs, cmd_schedules, cmd_status
    from .scale import cmd_scale
    from .server import cmd_server

    commands: dict[str, Callable[[argparse.Namespace], ExitCode]] = {
        "worker": cmd_worker,
        "status": cmd_status,
        "info": cmd_info,
        "jobs": cmd_jobs,
        "schedules": cmd_schedules,
        "scale": cmd_scale,
        "server": cmd_server,
    }
    try:
        code = commands[args.command](args)
    except KeyboardInterrupt:
        code = ExitCode.ERROR
    sys.exit(int(code))


def cmd_worker(args: argparse.Namespace) -> ExitCode:
    """``qflow worker``: a supervisor of ``-p`` processes, or one worker in this process."""
    from .child import ChildConfig, exit_process, run_child

    cfg = ChildConfig(
        target=args.target,
        queues=args.queues,
        concurrency=args.concurrency,
        burst=bool(args.burst),
        drain_timeout=args.drain_timeout,
        max_jobs=args.max_jobs_per_child,
        max_memory_mb=args.max_memory_per_child,
        log_level=args.log_level,
        log_config=not args.no_log_config,
        supervised=not args.in_process,
        name="worker",
        loop=args.loop,
    )
    if args.in_process:
        exit_process(run_child(cfg))
    from .control import run_dir
    from .importer import BadTarget, split_target
    from .output import fail
    from .supervisor import Supervisor

    try:
        split_target(args.target)  # the form only: the supervisor never imports the app
    except BadTarget as exc:
        return fail(ExitCode.BAD_TARGET, str(exc))

    return Supervisor(cfg, args.processes, hang_timeout=args.hang_timeout, control_dir=run_dir()).run()
