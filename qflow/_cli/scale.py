"""``qflow scale``: show or change the process count of running ``qflow worker`` supervisors on this host.

It finds a supervisor by pid or by target through the control sockets in the run directory (``control``) and
sends it one JSON request, like SIGTTIN/SIGTTOU but to an exact count; ``--wait`` polls until it is reached.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .control import MAX_PROCESSES, control_request, find_supervisors, run_dir
from .exitcodes import ExitCode
from .importer import BadTarget, split_target
from .output import fail, out, print_json

__all__ = ("cmd_scale",)


def cmd_scale(args: argparse.Namespace) -> ExitCode:
    """``qflow scale``: show or change the process count of running supervisors on this host."""
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
            if not 1 <= request.get("n", 1) <= MAX_PROCESSES or abs(request.get("delta", 0)) > MAX_PROCESSES:
                raise ValueError(text)
        except ValueError:
            return fail(
                ExitCode.USAGE,
                f"N must be a count from 1 to {MAX_PROCESSES}, +K or -K, got {args.count!r}",
            )
    replies = []
    for path in matches:
        try:
            reply = control_request(path, request)
            if args.wait and request["cmd"] == "scale":
                reply = _wait_scaled(path, reply)
        except (OSError, ValueError) as exc:
            return fail(ExitCode.NOT_FOUND, f"cannot reach the supervisor at {path}: {exc}")
        if "error" in reply:
            return fail(ExitCode.USAGE, f"the supervisor at {path} refused the request: {reply['error']}")
        replies.append(reply)
    if args.json:
        print_json(replies)
        return ExitCode.OK
    for reply in replies:
        kids = reply["children"]
        out(
            f"supervisor {reply['pid']} ({reply['target']}): {reply['desired']} process(es) wanted, "
            f"{len(kids)} running"
        )
        for c in kids:
            ready = "ready" if c["ready"] else "starting"
            out(f"  {c['name']:<12} pid {c['pid']:<8} {c['state']:<10} {ready}")
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
        if "error" in reply:
            return reply
    return reply


def _control(path: Path) -> dict[str, Any]:
    return control_request(path, {"cmd": "status"})
