"""``qflow server status|start|stop``: the project's embedded Valkey server, and why that one.

The server used when no Redis URL is configured (``qflow._embedded``): this command shows which directory
holds it and why, starts it, or stops it (its AOF is written first).
"""

from __future__ import annotations

import argparse
import sys

from .exitcodes import ExitCode
from .output import fail, print_json

__all__ = ("cmd_server",)


def cmd_server(args: argparse.Namespace) -> ExitCode:
    """``qflow server status|start|stop``: the project's embedded Valkey server, and why that one.

    A data directory, socket or server of another user is refused: exit ``CONFIG`` with the reason.
    """
    from ..exceptions import ConfigurationError

    try:
        return _server(args)
    except ConfigurationError as exc:
        return fail(ExitCode.CONFIG, str(exc))


def _server(args: argparse.Namespace) -> ExitCode:
    import dataclasses

    from .. import _embedded

    server = _embedded.server_for(args.home)
    if args.home:
        server = dataclasses.replace(server, reason="given by --home")
    if args.action == "start":
        started = _embedded.ensure_running(server)
    elif args.action == "stop":
        was_running = _embedded.stop(server)
        if args.json:
            print_json({"home": str(server.home), "reason": server.reason, "stopped": was_running})
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
        print_json(info)
    else:
        state = f"running, pid {pid}" if running else "not running"
        sys.stdout.write(
            f"embedded Valkey: {state}\n  data:   {server.home}\n  why:    {server.reason}\n"
            f"  socket: {server.socket}\n"
        )
    return ExitCode.OK if running else ExitCode.NOT_FOUND
