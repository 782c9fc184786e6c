"""How the one-shot commands print: lines and aligned tables on stdout, ``--json``, errors on stderr.

Everything a command shows goes through here, so the tables, times and ``qflow: error:`` lines read the
same in ``status``, ``info``, ``jobs``, ``scale`` and ``server``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from .exitcodes import ExitCode

__all__ = ("ago", "err", "fail", "indent", "out", "print_json", "table", "when")


def out(text: str) -> None:
    """One line (or block) of a command's output, on stdout."""
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")


def fail(code: ExitCode, message: str) -> ExitCode:
    """Print ``qflow: error: message`` on stderr and return ``code``."""
    err(f"qflow: error: {message}")
    return code


def print_json(data: Any) -> None:
    out(msgspec.json.format(msgspec.json.encode(data, enc_hook=repr), indent=2).decode())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Plain aligned columns (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def when(at: float | None) -> str:
    """Server time (Unix seconds) as local date and time, to the millisecond."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"
