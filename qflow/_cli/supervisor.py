"""The parent of ``qflow worker -p N``: spawn, watch, reap, replace, scale, recycle and stop worker processes.

The supervisor never imports the app, opens Redis or runs an event loop. Each child is a fresh interpreter
(``python -m qflow._cli.child``, started by ``children.spawn``) that imports ``module:app`` itself; the
parent only reads one-byte beats from a pipe per child (``b`` booted, ``r`` ready, ``.`` alive, ``x``
recycling) and their exit statuses.

Signal handlers only enqueue the signal; the main loop (``select`` on the beat pipes, the signal wakeup fd and
the control socket) does the work:

====================  ==============================================================================
SIGTERM, SIGINT       children drain (SIGTERM to each), exit 0 when all are done; a second one = SIGQUIT
SIGQUIT               stop now: children release unfinished jobs and exit within a second or two
SIGHUP                rolling restart: per child, start a new one, and drain the old once the new is ready
SIGTTIN / SIGTTOU     one child more / one fewer (the youngest drains); the others are not touched
====================  ==============================================================================

``qflow scale`` talks to the same loop through a unix socket (``<run dir>/qflow-<pid>.sock``, JSON lines).

A child that dies unexpectedly is reaped with its decoded status and replaced, with backoff when children
die young; ``MAX_RESTARTS`` young deaths in a row is a crash loop and stops the supervisor (exit
``CRASH_LOOP``). A child that fails at boot with ``BAD_TARGET`` or ``CONFIG`` before any child was ever
ready stops it at once with that code (no respawn loop); only one child boots until one has imported the
target, so a bad target is reported once. A child that stops beating for ``hang_timeout`` is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec

from .child import ChildConfig
from .children import Child, spawn
from .control import ControlSocket
from .exitcodes import BOOT_FAILURES, ExitCode, describe_exit

__all__ = ("Supervisor",)

log = logging.getLogger("qflow.supervisor")

HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
)
MAX_RESTARTS = 10
"""Children dying young (before MIN_UPTIME of readiness) in a row before the supervisor gives up."""
MIN_UPTIME = 2.0
FAST_STOP_GRACE = 3.0
"""Seconds children get to release their jobs after SIGQUIT before they are SIGKILLed."""


def _backoff(streak: int) -> float:
    """Delay before replacing a child, after ``streak`` young deaths in a row: 0, 0, 0.5, 1, 2, ... 10 s."""
    return 0.0 if streak <= 1 else min(0.5 * 2 ** (streak - 2), 10.0)


class Supervisor:
    """Runs ``processes`` copies of one child config until stopped; ``run()`` returns the exit code."""

    def __init__(
        self,
        child: ChildConfig,
        processes: int,
        *,
        hang_timeout: float = 30.0,
        boot_timeout: float = 60.0,
        control_dir: Path | None = None,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.template = child
        self.max_restarts = max_restarts
        self.desired = max(1, processes)
        self.hang_timeout = hang_timeout
        self.boot_timeout = boot_timeout
        self.control_dir = control_dir
        self.children: dict[int, Child] = {}
        self._signals: list[int] = []
        self._sel = selectors.DefaultSelector()
        self._exit: ExitCode | None = None
        self._stopping: str | None = None  # None | "graceful" | "fast"
        self._fast_deadline = 0.0
        self._counter = 0
        self._streak = 0
        self._unavailable = 0
        self._next_spawn = 0.0
        self._ever_booted = False
        self._ever_ready = False
        self._roll: list[Child] = []
        self._roll_new: Child | None = None
        self._control: ControlSocket | None = None
        self.control_path: Path | None = None

    # -- main loop --------------------------------------------------------------------------------------

    def run(self) -> ExitCode:
        """Start the children and supervise them until stopped; return the process exit code."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._sel.register(wake_r, selectors.EVENT_READ, "wake")
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED}
        try:
            self._open_control()
            log.info(
                "supervisor started: %d worker process(es) of %s (pid %d; SIGTTIN/SIGTTOU scale, SIGHUP "
                "restarts, SIGTERM drains)",
                self.desired,
                self.template.target,
                os.getpid(),
            )
            while True:
                while self._signals:
                    self._handle_signal(self._signals.pop(0))
                self._reap()
                self._check_liveness()
                if self._exit is None:
                    self._reconcile()
                if self._exit is not None and not self.children:
                    break
                for key, _ in self._sel.select(timeout=0.25):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                    elif key.data == "control":
                        self._serve_control()
                    else:
                        self._read_beats(key.data)
        except Exception:
            log.exception("supervisor failed; killing the workers")
            self._exit = ExitCode.ERROR
        finally:
            for c in list(self.children.values()):
                c.signal(signal.SIGKILL)
                c.proc.wait()
                self._forget(c)
            if self._control is not None:
                self._control.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            self._sel.close()
            os.close(wake_r)
            os.close(wake_w)
        log.info("supervisor exiting with code %d (%s)", self._exit, self._exit.name)
        return self._exit

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # only enqueue: the main loop acts on it

    def _handle_signal(self, signum: int) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGCHLD:
            return  # woke the loop; _reap looks
        if sig in (signal.SIGTERM, signal.SIGINT):
            if self._stopping is None:
                log.info("%s: draining %d worker(s); send again to stop now", sig.name, len(self.children))
                self.stop(fast=False)
            else:
                log.warning("second %s: stopping now, releasing unfinished jobs", sig.name)
                self.stop(fast=True)
        elif sig == signal.SIGQUIT:
            log.warning("SIGQUIT: stopping now, releasing unfinished jobs")
            self.stop(fast=True)
        elif self._stopping is not None:
            log.info("%s ignored: stopping", sig.name)
        elif sig == signal.SIGHUP:
            self.restart()
        elif sig == signal.SIGTTIN:
            self.scale(self.desired + 1, why="SIGTTIN")
        elif sig == signal.SIGTTOU:
            self.scale(self.desired - 1, why="SIGTTOU")

    # -- commands (from signals or the control socket) -------------------------------------------------

    def stop(self, *, fast: bool, code: ExitCode = ExitCode.OK) -> None:
        """Drain every child (``fast``: make them release their jobs now); exit once all are gone."""
        if self._exit is None:
            self._exit = code
        self._roll.clear()
        if fast and self._stopping != "fast":
            self._stopping = "fast"
            self._fast_deadline = time.monotonic() + FAST_STOP_GRACE
            for c in self.children.values():
                c.signal(signal.SIGQUIT)
        elif self._stopping is None:
            self._stopping = "graceful"
            for c in self.children.values():
                if c.state != "recycling":
                    self._retire(c, None)

    def scale(self, n: int, *, why: str) -> int:
        """Set the number of worker processes (at least 1); surplus children drain, youngest first."""
        n = max(1, n)
        if n != self.desired:
            log.info("%s: scaling from %d to %d worker process(es)", why, self.desired, n)
        self.desired = n
        return n

    def restart(self) -> None:
        """Rolling restart: each running child is replaced by a new one (new code), one at a time."""
        olds = [c for c in self.children.values() if c.state == "active"]
        log.info("rolling restart of %d worker(s), one at a time", len(olds))
        self._roll = olds

    # -- children ---------------------------------------------------------------------------------------

    def _spawn(self, replaces: Child | None = None) -> Child:
        self._counter += 1
        cfg = msgspec.structs.replace(
            self.template,
            name=f"worker-{self._counter}",
            supervisor_pid=os.getpid(),
            # A booted child has resolved the app's URL and said which embedded server it uses, if any: the
            # others keep quiet (this process never imports the app, so it cannot say it itself).
            announce_embedded=self.template.announce_embedded and not self._ever_booted,
        )
        c = spawn(cfg, block=HANDLED, replaces=replaces)
        self.children[c.pid] = c
        self._sel.register(c.pipe, selectors.EVENT_READ, c)
        log.info("started %s (pid %d)%s", c.name, c.pid, f" to replace {replaces.name}" if replaces else "")
        return c

    def _retire(self, c: Child, why: str | None) -> None:
        if why:
            log.info("%s (pid %d): draining (%s)", c.name, c.pid, why)
        c.state = "retiring"
        c.signal(signal.SIGTERM)

    def _forget(self, c: Child) -> None:
        self.children.pop(c.pid, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.pipe)
        c.close()

    def _read_beats(self, c: Child) -> None:
        data = c.read_beats()
        if data is None:
            return
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(c.pipe)
            return
        c.take_beats(data, time.monotonic())
        self._ever_booted = self._ever_booted or c.booted
        self._ever_ready = self._ever_ready or c.ready_at is not None

    def _reap(self) -> None:
        for c in list(self.children.values()):
            rc = c.proc.poll()
            if rc is not None:
                self._forget(c)
                self._on_exit(c, rc)
        if self._exit is None and self.template.burst and self.desired == 0 and not self.children:
            log.info("every worker finished: the queues are drained")
            self._exit = ExitCode.OK

    def _on_exit(self, c: Child, rc: int) -> None:
        now = time.monotonic()
        how = describe_exit(rc)
        if c.killed and rc == -signal.SIGKILL:
            how = f"killed by SIGKILL ({c.killed})"
        who = f"{c.name} (pid {c.pid})"
        if c is self._roll_new:
            self._roll_new = None
            if c.replaces is not None and c.replaces.state == "replacing":
                c.replaces.state = "active"
            if rc in BOOT_FAILURES:
                log.error("rolling restart aborted: new %s %s; the running workers keep going", who, how)
                self._roll.clear()
                return
        if self._stopping is not None or c.state == "retiring":
            log.info("%s %s (%s)", who, how, "stopped now" if self._stopping == "fast" else "drained")
            return
        if c.state == "recycling" or rc == ExitCode.RECYCLE:
            log.info("%s recycled (%s)", who, how)
            return
        if self.template.burst and rc == 0:
            log.info("%s finished: its queues are drained (burst)", who)
            self.desired -= 1
            return
        if rc in BOOT_FAILURES and not self._ever_ready:
            log.error(
                "%s %s at boot: not restarting it (fix the target, the options or the Redis URL's "
                "credentials, then start again)",
                who,
                how,
            )
            self.stop(fast=False, code=ExitCode(rc))
            return
        if rc == ExitCode.UNAVAILABLE:
            self._unavailable += 1
            delay = min(0.5 * 2 ** min(self._unavailable, 5), 10.0)
            log.warning("%s %s: Redis is unreachable; next try in %.1fs", who, how, delay)
            self._next_spawn = max(self._next_spawn, now + delay)
            return
        young = not c.stable
        if young:
            self._streak += 1
        delay = _backoff(self._streak) if young else 0.0
        uptime = now - c.started
        if self._streak >= self.max_restarts:
            log.error(
                "crash loop: %d workers in a row died within %.0fs of starting (last: %s %s); giving up",
                self._streak,
                MIN_UPTIME,
                who,
                how,
            )
            self.stop(fast=False, code=ExitCode.CRASH_LOOP)
            return
        log.warning(
            "%s %s after %.1fs; replacing it%s", who, how, uptime, f" in {delay:.1f}s" if delay else ""
        )
        self._next_spawn = max(self._next_spawn, now + delay)

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for c in self.children.values():
            if c.killed:
                continue
            if c.ready_at is not None and not c.stable and now - c.ready_at >= MIN_UPTIME:
                c.stable = True
                self._streak = 0
                self._unavailable = 0
            if self._stopping == "fast" and now > self._fast_deadline:
                c.killed = f"did not stop within {FAST_STOP_GRACE:.0f}s of SIGQUIT"
            elif c.ready_at is None and now - c.started > self.boot_timeout:
                c.killed = f"not ready {self.boot_timeout:.0f}s after it started"
            elif c.ready_at is not None and 0 < self.hang_timeout < now - c.last_beat:
                c.killed = f"no heartbeat for {now - c.last_beat:.1f}s: its event loop is blocked or it hangs"
            if c.killed:
                log.error(
                    "%s (pid %d): %s; killing it (its jobs come back by lease)", c.name, c.pid, c.killed
                )
                c.signal(signal.SIGKILL)

    def _reconcile(self) -> None:
        now = time.monotonic()
        if self._roll_new is not None and self._roll_new.ready_at is not None:
            old = self._roll_new.replaces
            self._roll_new = None
            if old is not None and old.state == "replacing" and old.pid in self.children:
                self._retire(old, "rolling restart: its replacement is ready")
            if not self._roll:
                log.info("rolling restart done")
        while self._roll_new is None and self._roll:
            old = self._roll.pop(0)
            if old.pid in self.children and old.state == "active":
                old.state = "replacing"
                self._roll_new = self._spawn(replaces=old)
        active = [c for c in self.children.values() if c.state == "active"]
        for c in sorted(active, key=lambda c: c.started, reverse=True)[: max(0, len(active) - self.desired)]:
            self._retire(c, "scaling down")
            active.remove(c)
        missing = self.desired - len(active)
        if missing <= 0 or now < self._next_spawn:
            return
        if not self._ever_booted:
            # Boot one child first: a bad target is then reported once, by one child, not by N.
            if not any(not c.booted for c in active):
                self._spawn()
            return
        for _ in range(missing):
            self._spawn()

    # -- control socket ---------------------------------------------------------------------------------

    def _open_control(self) -> None:
        if self.control_dir is None:
            return
        try:
            self._control = ControlSocket(self.control_dir)
        except OSError as exc:
            log.warning("no control socket in %s (%s): `qflow scale` cannot reach it", self.control_dir, exc)
            return
        self.control_path = self._control.path
        self._sel.register(self._control.sock, selectors.EVENT_READ, "control")

    def _serve_control(self) -> None:
        assert self._control is not None
        try:
            self._control.serve(self._command)
        except (OSError, ValueError) as exc:
            log.debug("control request failed: %s", exc)

    def _command(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "scale" and self._stopping is None:
            n = req["n"] if "n" in req else self.desired + int(req.get("delta", 0))
            self.scale(int(n), why="qflow scale")
        elif cmd == "restart" and self._stopping is None:
            self.restart()
        elif cmd not in ("status", "scale", "restart"):
            return {"error": f"unknown command {cmd!r}"}
        return self.status()

    def status(self) -> dict[str, Any]:
        """What ``qflow scale`` sees: pid, target, desired count and each child's name, pid and state."""
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "target": self.template.target,
            "desired": self.desired,
            "stopping": self._stopping,
            "children": [c.describe(now) for c in sorted(self.children.values(), key=lambda c: c.started)],
        }
