"""One worker process of ``qflow worker``: a fresh interpreter that imports ``module:app`` itself.

The supervisor starts it as ``python -m qflow._cli.child '<json config>'`` (never a fork of a process
holding an event loop or a Redis connection). The child:

- imports the target; a bad one exits with ``ExitCode.BAD_TARGET`` (``CONFIG`` when the app cannot run as
  asked, or Redis refuses its credentials, its ACL user or its TLS certificate: checked before it reports
  ready), which tells the supervisor a restart would not help;
- runs a ``Worker`` with companions: a liveness beat on a pipe to the supervisor (written *from the event
  loop*, so a blocked loop goes silent and gets killed), the fleet heartbeat in Redis, and its ``guards``: a
  memory guard and a watchdog thread that names the ``async`` processor blocking the loop;
- stops on SIGTERM by draining (always: a second SIGTERM from a process manager that signals the whole group
  must not turn into a fast stop), and on SIGQUIT at once, releasing unfinished jobs. SIGINT is ignored: the
  terminal's Ctrl-C reaches the whole process group, and the supervisor decides what it means;
- never outlives its supervisor: ``PR_SET_PDEATHSIG`` (Linux) sends it SIGQUIT when the supervisor dies, and
  a thread watching stdin (a pipe only the supervisor holds) sees EOF on any platform.

The same code runs ``qflow worker --in-process`` (no supervisor, ``supervised=False``): there SIGTERM/SIGINT
drain and a second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec

from .exitcodes import ExitCode
from .guards import loop_watchdog, memory_guard
from .logs import configure_logging

if TYPE_CHECKING:
    from .._worker.worker import Worker

__all__ = ("ChildConfig", "exit_process", "loop_runner", "main", "run_child")

log = logging.getLogger("qflow.worker")

BEAT_INTERVAL = 0.5
"""Seconds between two liveness beats on the supervisor pipe."""
GIL_SWITCH_INTERVAL = 0.001
"""Seconds a thread may hold the GIL while another waits (Python's default is 0.005)."""
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ChildConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker process runs, passed by the supervisor as JSON (never pickle)."""

    target: str
    name: str = "worker"
    queues: list[str] | None = None
    concurrency: int | None = None
    burst: bool = False
    drain_timeout: float | None = None
    max_jobs: int | None = None
    max_memory_mb: float | None = None
    log_level: str = "INFO"
    log_config: bool = True
    supervised: bool = True
    heartbeat_fd: int = -1
    """Write end of the liveness pipe to the supervisor (-1: none)."""
    supervisor_pid: int = 0
    block_warning: float = 0.1
    """Seconds an ``async`` processor may hold the event loop before a warning names it."""
    fleet_interval: float = 2.0
    loop: str = "asyncio"
    """The event loop: ``asyncio`` or ``uvloop``."""
    announce_embedded: bool = True
    """Print the embedded-server line on stderr (the supervisor turns it off once a child has booted, so a
    ``qflow worker -p N`` says it once, not once per process, restart or recycle)."""


def loop_runner(name: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """``asyncio.run``, or ``uvloop.run`` for ``"uvloop"`` (a clear error when it is not installed)."""
    from ..exceptions import ConfigurationError

    if name == "asyncio":
        return asyncio.run
    if name != "uvloop":
        raise ConfigurationError(f"unknown event loop {name!r}: asyncio or uvloop")
    try:
        import uvloop
    except ImportError:
        raise ConfigurationError(
            "--loop uvloop: uvloop is not installed (pip install 'qflow[fast]')"
        ) from None
    run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    return run


class _Control:
    """Stop requests, from signal handlers or the parent-death watch; applied to the worker on its loop."""

    def __init__(self, cfg: ChildConfig) -> None:
        self.cfg = cfg
        self.stop_requested = False
        self.fast = False
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def request(self, fast: bool, why: str) -> None:
        """Ask for a stop (``fast``: release unfinished jobs now). Runs on the loop thread, or before it."""
        if self.fast or (self.stop_requested and not fast):
            return
        self.stop_requested = True
        self.fast = self.fast or fast
        if fast:
            log.warning("%s: stopping now, releasing unfinished jobs", why)
        else:
            drain = self.worker.settings.drain_timeout if self.worker else 0.0
            log.info("%s: draining (up to %.0fs)", why, drain)
        if self.worker is not None:
            self.worker.stop(fast=fast)

    def on_signal(self, signum: int) -> None:
        """What a signal means in this process (see the module docstring)."""
        sig = signal.Signals(signum)
        if sig == signal.SIGQUIT:
            orphaned = self.cfg.supervisor_pid and os.getppid() != self.cfg.supervisor_pid
            self.request(True, "supervisor gone (SIGQUIT)" if orphaned else sig.name)
        elif self.cfg.supervised:
            self.request(False, sig.name)
        else:
            self.request(self.stop_requested, f"second {sig.name}" if self.stop_requested else sig.name)

    def parent_gone(self) -> None:
        """Called from the stdin-watch thread when the supervisor's end of the pipe closes."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.request, True, "supervisor gone")
        else:
            self.stop_requested = self.fast = True


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of ``python -m qflow._cli.child '<json ChildConfig>'``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m qflow._cli.child '<json config>' (started by `qflow worker`)\n")
        sys.exit(ExitCode.USAGE)
    try:
        cfg = msgspec.json.decode(args[0], type=ChildConfig)
    except msgspec.DecodeError as exc:
        sys.stderr.write(f"qflow._cli.child: bad config: {exc}\n")
        sys.exit(ExitCode.USAGE)
    exit_process(run_child(cfg))


def exit_process(code: int) -> NoReturn:
    """Exit with ``code`` without waiting for abandoned handler threads.

    A sync handler abandoned at its timeout or at a fast stop still runs in its (non-daemon) thread; its job
    is already released or recorded, so the process must not wait for it at interpreter exit.
    """
    logging.shutdown()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_child(cfg: ChildConfig) -> ExitCode:
    """Run one worker process to completion and say how it ended."""
    ctl = _Control(cfg)
    _install_signals(ctl)
    if cfg.log_config:
        configure_logging(cfg.log_level, cfg.name)
    if cfg.supervised:
        _watch_parent(ctl)
    if ctl.stop_requested:
        return ExitCode.OK

    from .._worker.worker import Worker
    from ..exceptions import BrokerAuthError, BrokerUnavailable, ClientPoolExhausted, ConfigurationError
    from .importer import BadTarget, load_app

    try:
        app = load_app(cfg.target)
    except BadTarget as exc:
        log.error("%s", exc)
        if exc.details:
            log.error("%s", exc.details.rstrip())
        return ExitCode.BAD_TARGET
    try:
        # No Redis URL is a configuration error, better found now than by the first claim.
        app.resolve_url(announce=cfg.announce_embedded)
        settings = app.worker_settings
        if cfg.drain_timeout is not None:
            settings = msgspec.structs.replace(settings, drain_timeout=cfg.drain_timeout)
        worker = Worker(
            app,
            cfg.queues,
            concurrency=cfg.concurrency,
            burst=cfg.burst,
            settings=settings,
            max_jobs=_jittered(cfg.max_jobs),
            companions=_companions(cfg, ctl),
        )
    except (ConfigurationError, ValueError) as exc:
        log.error("cannot run %s: %s", cfg.target, exc)
        return ExitCode.CONFIG
    ctl.worker = worker
    # Sync processors run in threads that hold the GIL; the event loop (lease renewal, acks) must get it back
    # quickly. At the default 5 ms switch interval, 8 CPU-bound handlers on a loaded 2-core box starved
    # renewal past a 1 s lease in half the runs; at 1 ms, in none (issue #3 notes).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    _beat(cfg, b"b")  # booted: the target imports; the supervisor may start the other children now
    try:
        runner = loop_runner(cfg.loop)
    except ConfigurationError as exc:
        log.error("cannot run %s: %s", cfg.target, exc)
        return ExitCode.CONFIG
    if cfg.loop != "asyncio":
        log.info("event loop: %s", cfg.loop)
    try:
        runner(_run(worker, ctl))
    except BrokerAuthError as exc:
        # Not retried: a restart would be refused the same way (issue 12 item 10).
        log.error("cannot run %s: %s", cfg.target, exc)
        return ExitCode.CONFIG
    except ClientPoolExhausted as exc:
        log.error("worker stopped: %s", exc)
        return ExitCode.UNAVAILABLE
    except BrokerUnavailable as exc:
        log.error("cannot reach Redis: %s", exc)
        return ExitCode.UNAVAILABLE
    except ConfigurationError as exc:
        log.error("cannot run %s: %s", cfg.target, exc)
        return ExitCode.CONFIG
    except Exception:
        log.exception("worker crashed")
        return ExitCode.ERROR
    finally:
        _install_signals(ctl)  # the loop's handlers are gone with it; keep stop requests harmless
    if ctl.stop_requested or cfg.burst or not worker.stopping:
        return ExitCode.OK
    return ExitCode.RECYCLE


async def _run(worker: Worker, ctl: _Control) -> None:
    loop = asyncio.get_running_loop()
    ctl.loop = loop
    sigs = [signal.SIGTERM, signal.SIGQUIT] + ([] if ctl.cfg.supervised else [signal.SIGINT])
    for sig in sigs:
        loop.add_signal_handler(sig, ctl.on_signal, sig)
    try:
        # Worker.run checks the server and the ACL user's access to the queues' keys before it starts any
        # part, so a refusal is a boot failure the supervisor does not restart (the ready report comes later).
        await worker.run()
    finally:
        ctl.loop = None
        await worker.app.close()


def _companions(cfg: ChildConfig, ctl: _Control) -> list[Callable[[Worker], Awaitable[None]]]:
    from .._fleet import heartbeat

    out: list[Callable[[Worker], Awaitable[None]]] = [
        _apply_early_stop(ctl),
        heartbeat(
            target=cfg.target,
            name=cfg.name,
            supervisor_pid=cfg.supervisor_pid,
            concurrency=cfg.concurrency,
            interval=cfg.fleet_interval,
        ),
    ]
    if cfg.heartbeat_fd >= 0:
        out.append(_supervisor_link(cfg, ctl))
    if cfg.max_memory_mb:
        out.append(memory_guard(cfg.max_memory_mb))
    if cfg.block_warning > 0:
        out.append(loop_watchdog(cfg.block_warning))
    return out


def _apply_early_stop(ctl: _Control) -> Callable[[Worker], Awaitable[None]]:
    """A stop requested before ``Worker.run`` created its stop event is applied once it runs."""

    async def run(worker: Worker) -> None:
        if ctl.stop_requested:
            worker.stop(fast=ctl.fast)

    return run


# -- liveness pipe to the supervisor ---------------------------------------------------------------------


def _beat(cfg: ChildConfig, byte: bytes) -> bool:
    """Write one byte to the supervisor; False if it is gone (the pipe's read end closed)."""
    if cfg.heartbeat_fd < 0:
        return True
    try:
        os.write(cfg.heartbeat_fd, byte)
    except BlockingIOError:
        pass  # the supervisor is behind on reading; it will see the next one
    except OSError:
        return False
    return True


def _supervisor_link(cfg: ChildConfig, ctl: _Control) -> Callable[[Worker], Awaitable[None]]:
    """Beat on the pipe from the event loop: ``r`` once fetching, ``.`` every BEAT_INTERVAL, ``x`` when
    the worker stops by itself (max jobs or memory) so the supervisor starts the replacement right away."""

    async def run(worker: Worker) -> None:
        os.set_blocking(cfg.heartbeat_fd, False)
        await worker.ready.wait()
        byte = b"r"
        told_recycle = False
        while True:
            if worker.stopping and not ctl.stop_requested and not told_recycle and not cfg.burst:
                byte, told_recycle = b"x", True
            if not _beat(cfg, byte):
                ctl.request(True, "supervisor gone")
                return
            byte = b"."
            await asyncio.sleep(BEAT_INTERVAL)

    return run


def _watch_parent(ctl: _Control) -> None:
    """Stop when the supervisor dies: PR_SET_PDEATHSIG on Linux, and EOF on stdin everywhere."""
    cfg = ctl.cfg
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGQUIT), 0, 0, 0)
        except (OSError, AttributeError) as exc:
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
    if cfg.supervisor_pid and os.getppid() != cfg.supervisor_pid:
        # The supervisor died before prctl could take effect.
        ctl.stop_requested = ctl.fast = True
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        ctl.parent_gone()
        # Backstop: if the loop is blocked and cannot stop, leave anyway; the jobs come back by lease.
        time.sleep(5.0)
        log.error("supervisor gone and the worker did not stop within 5s: exiting now")
        logging.shutdown()
        os._exit(ExitCode.ERROR)

    threading.Thread(target=watch, name="qflow-parent-watch", daemon=True).start()


def _install_signals(ctl: _Control) -> None:
    """Signal dispositions outside the event loop: record stop requests; ignore what the supervisor owns."""

    def handler(signum: int, frame: FrameType | None) -> None:
        ctl.on_signal(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGQUIT, handler)
    if ctl.cfg.supervised:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        # The supervisor blocks signals while it spawns us, and the mask survives exec: unblock them now
        # that the handlers are in place (a stop sent during our boot is delivered here, not lost).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD})
    else:
        signal.signal(signal.SIGINT, handler)


# -- recycling -------------------------------------------------------------------------------------------


def _jittered(max_jobs: int | None) -> int | None:
    """``max_jobs`` plus up to 10% (at least 0..1), so children started together do not recycle together."""
    if max_jobs is None:
        return None
    return max_jobs + random.randint(0, max(1, max_jobs // 10))


if __name__ == "__main__":
    main()
