"""One worker process as the supervisor sees it: how it is started, its state, its beats, its pipes.

Each child is a fresh interpreter, ``python -m qflow._cli.child '<json ChildConfig>'``, never a fork of the
supervisor. It holds the write end of a pipe on which it sends one-byte beats (``b`` booted, ``r`` ready,
``.`` alive, ``x`` recycling), and its stdin is a pipe only the supervisor holds: EOF there tells it the
supervisor is gone. What the beats and exit statuses *mean* is the supervisor's business (``supervisor``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from .child import ChildConfig

__all__ = ("CHILD_MODULE", "Child", "spawn")

log = logging.getLogger("qflow.supervisor")

CHILD_MODULE = "qflow._cli.child"
"""What ``python -m`` runs in each worker process."""


@dataclass(eq=False)
class Child:
    """A worker process started by ``spawn``: its ``Popen``, the read end of its beat pipe, and its state."""

    name: str
    proc: subprocess.Popen[bytes]
    pipe: int
    started: float
    replaces: Child | None = None
    state: str = "active"  # active | replacing (its successor boots) | retiring | recycling
    booted: bool = False
    ready_at: float | None = None
    last_beat: float = 0.0
    stable: bool = False
    killed: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def read_beats(self) -> bytes | None:
        """The beats sent since the last read; ``b""`` once the pipe is closed, None if there are none."""
        try:
            return os.read(self.pipe, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def take_beats(self, data: bytes, now: float) -> None:
        """Record beats read from the pipe: alive now, booted, ready, or recycling."""
        self.last_beat = now
        if b"b" in data:
            self.booted = True
        if b"r" in data and self.ready_at is None:
            self.ready_at = now
            log.info("%s (pid %d) ready in %.2fs", self.name, self.pid, now - self.started)
        if b"x" in data and self.state == "active":
            self.state = "recycling"
            log.info("%s (pid %d) is recycling: it drains while its replacement starts", self.name, self.pid)

    def describe(self, now: float) -> dict[str, Any]:
        """What ``qflow scale`` shows of it: name, pid, state, ready, uptime."""
        return {
            "name": self.name,
            "pid": self.pid,
            "state": self.state,
            "ready": self.ready_at is not None,
            "uptime": round(now - self.started, 3),
        }

    def close(self) -> None:
        """Close the supervisor's ends of the child's pipes (beats and stdin)."""
        with contextlib.suppress(OSError):
            os.close(self.pipe)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def spawn(cfg: ChildConfig, *, block: Iterable[signal.Signals], replaces: Child | None = None) -> Child:
    """Start a worker process running ``cfg`` with a fresh beat pipe; ``block``: the supervisor's signals."""
    beat_r, beat_w = os.pipe()
    cfg = msgspec.structs.replace(cfg, heartbeat_fd=beat_w)
    argv = [sys.executable, "-m", CHILD_MODULE, msgspec.json.encode(cfg).decode()]
    # Block our signals while spawning: none may run our handler in the child between fork and exec.
    # The mask survives exec; the child unblocks once its own handlers are in place.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, block)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=(beat_w,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(beat_w)
    os.set_blocking(beat_r, False)
    now = time.monotonic()
    return Child(cfg.name, proc, beat_r, now, replaces=replaces, last_beat=now)
