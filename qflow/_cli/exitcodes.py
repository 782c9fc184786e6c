"""Exit codes of the ``qflow`` command, in one place (documented on the CLI page, docs/cli.md).

A supervisor's child uses the same codes to tell its parent why it stopped: ``BAD_TARGET`` and ``CONFIG`` at
boot mean "starting me again will not help" (the supervisor halts instead of respawning), ``RECYCLE`` means
"I drained on purpose (--max-jobs-per-child / --max-memory-per-child): start my replacement".
"""

from __future__ import annotations

import enum
import signal

__all__ = ("BOOT_FAILURES", "MEANING", "ExitCode", "describe_exit")


class ExitCode(enum.IntEnum):
    """Every exit status the ``qflow`` command uses (``MEANING`` says what each one means)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    BAD_TARGET = 3
    CONFIG = 4
    UNAVAILABLE = 5
    NOT_FOUND = 6
    CRASH_LOOP = 7
    RECYCLE = 8


MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "done: workers drained after SIGTERM/SIGINT (or the queues are empty with --burst); a "
    "command succeeded",
    ExitCode.ERROR: "unexpected error (a bug: the traceback is logged), or a confirmation answered no",
    ExitCode.USAGE: "bad command line or QFLOW_* variable; a destructive command without --yes and no "
    "terminal",
    ExitCode.BAD_TARGET: "module:app cannot be loaded: module or attribute missing, the import raised, or it "
    "is not a qflow.App",
    ExitCode.CONFIG: "the app loaded but cannot run as asked: unknown queue in -q, no processors, bad "
    "setting, server too old; Redis refused the credentials, the ACL user's permissions or the TLS "
    "certificate; a queue written by another qflow schema, or a queue key holding corrupt data",
    ExitCode.UNAVAILABLE: "Redis could not be reached (or refused a write at maxmemory: retry later)",
    ExitCode.NOT_FOUND: "no such job (jobs show / retry), or no running supervisor matches (scale)",
    ExitCode.CRASH_LOOP: "the supervisor gave up: worker processes kept dying right after they started",
    ExitCode.RECYCLE: "a worker drained to be replaced (--max-jobs-per-child / --max-memory-per-child); "
    "the supervisor starts a new one (seen only with --in-process)",
}
"""One line per exit code, shown by ``qflow worker --help`` and on the CLI page."""


# Codes a child returns at boot when a restart cannot help.
BOOT_FAILURES = frozenset({ExitCode.BAD_TARGET, ExitCode.CONFIG})


def describe_exit(returncode: int) -> str:
    """Say how a child ended, from ``Popen.returncode`` (negative = killed by that signal).

    ``-9`` -> ``"killed by SIGKILL — possible out-of-memory (see dmesg)"``; ``3`` -> ``"exited with code 3
    (BAD_TARGET)"``.
    """
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        text = f"killed by {name}"
        if -returncode == signal.SIGKILL:
            text += " — possible out-of-memory (see dmesg), or killed by an operator"
        return text
    try:
        meaning = ExitCode(returncode).name
    except ValueError:
        return f"exited with code {returncode}"
    return f"exited with code {returncode} ({meaning})"
