"""The fault-injection harness (issue #5): a server we may hurt, a proxy that breaks the network, a checker.

- ``ValkeyServer``: a ``valkey-server`` of our own (never the system Redis) on a free loopback port with its
  own data dir. It can be SIGKILLed, restarted on the same port (AOF on or off), paused with SIGSTOP/SIGCONT
  and put to ``DEBUG SLEEP``.
- ``Proxy``: a TCP proxy on 127.0.0.1 between clients and the server, on an event loop in its own thread (so a
  test that blocks its own loop does not slow the network down). Modes: ``pass``, ``reset`` (new connections
  are reset; ``reset_all`` resets the open ones), ``blackhole`` (sockets stay open, bytes vanish both ways),
  ``drop_replies`` (requests reach the server, replies vanish) and ``latency`` (every chunk is delayed).
  ``deafen_after(pattern)`` targets one call: the connection that sends a request containing ``pattern`` (a
  script's SHA, say) gets no reply from then on, and every other connection goes on as before.
- ``snapshot`` + ``check``: one MULTI reads a queue's whole state; ``check`` lists every broken invariant of
  DESIGN.md and counts what matters (lost, completed twice, healthy jobs failed, jobs outside the attempt and
  stall limits, finished sets over their retention bound).
- ``Finished``: a thread that records every job it sees finished, so a job that retention trimmed (every
  record of it deleted) still counts as completed or failed, not as lost.
- ``FaultWindow`` + ``in_flight``: when each fault was on and whom it hit; which jobs could have been in
  flight at it (the only jobs a fault may stall, run twice or, after enough faults, fail as stalled).
- ``Figures``: each test's numbers, printed as one JSON line (and appended to ``$QFLOW_FAULTS_REPORT`` when
  set, so one full run yields the table of the issue's note).

Everything started here is stopped in ``close()``/``stop()``; the fixtures in ``conftest.py`` call them
whatever the test did. Waiting is always polling with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis

import qflow
from qflow import _codec
from qflow._broker.keys import QueueKeys
from qflow.testing import valkey_binary
from tests.process.ledger_app import Ledger

# -- test-profile timing -----------------------------------------------------------------------------------

PROFILE = qflow.WorkerSettings(
    lease_ttl=1.0, check_interval=0.25, max_stalls=2, drain_timeout=5.0, block_timeout=0.5
)
"""Worker timings of the fault suite: a dead or silent worker's jobs are runnable again within ~1.25 s."""
SOCKET_TIMEOUT = 1.5
"""Client socket timeout of the fault suite: a dead TCP path surfaces within 1.5 s (production: 5 s)."""
RECOVERY_BOUND = PROFILE.lease_ttl + PROFILE.check_interval + 1.0
"""Seconds from a worker's death (or silence) to its jobs running elsewhere: lease + check + slack for a
loaded 2-core CI box (process start-up is not in it: the other worker is already fetching)."""


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.01) -> float:
    """Blocking poll of ``predicate`` until it holds; return when (monotonic), or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- the server -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pong(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class ValkeyServer:
    """One ``valkey-server`` process we own: start, SIGKILL, restart on the same port, pause, DEBUG SLEEP."""

    def __init__(self, *, appendonly: bool = True, extra: Iterable[str] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qflow-faults-"))
        self.appendonly = appendonly
        self.extra = list(extra)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.starts = 0
        self._sleepers: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            str(valkey_binary()),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",  # the default: a process kill (not a power cut) loses nothing
            "--maxmemory-policy", "noeviction",
            "--enable-debug-command", "local",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "server.log"),
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> float:
        """Start the server (a free port the first time, the same port after); return when it answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        ports = [self.port] if self.port else [free_port() for _ in range(5)]
        for port in ports:  # a free port can be taken by someone else before the server binds it
            self.port = port
            self.proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _pong(port):
                    self.starts += 1
                    self.paused = False
                    return time.monotonic()
                time.sleep(0.01)
            self._reap(kill=True)
        raise RuntimeError(f"valkey-server did not start on port {self.port}: {self.log()[-800:]}")

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _reap(self, *, kill: bool) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.paused:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.paused = False

    def kill(self) -> float:
        """SIGKILL the server (no shutdown, no AOF rewrite) and reap it; return when it died."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.paused = False
        return time.monotonic()

    def restart(self, *, appendonly: bool | None = None) -> float:
        """Start again on the same port (after ``kill``); with AOF it reloads what it had acknowledged."""
        if appendonly is not None:
            self.appendonly = appendonly
        return self.start()

    def pause(self) -> float:
        """SIGSTOP: the server stops answering; sockets stay open; its clock keeps running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        return time.monotonic()

    def resume(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False
        return time.monotonic()

    def debug_sleep(self, seconds: float) -> float:
        """Send ``DEBUG SLEEP seconds`` (the server blocks that long); return when it was sent.

        The reply is read and the socket closed by a thread, joined in ``close()``.
        """
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=seconds + 10)
        sock.sendall(f"DEBUG SLEEP {seconds}\r\n".encode())
        sent = time.monotonic()

        def finish() -> None:
            with sock, contextlib.suppress(OSError):
                sock.recv(64)

        t = threading.Thread(target=finish, name="debug-sleep", daemon=True)
        t.start()
        self._sleepers.append(t)
        return sent

    def client(self, *, timeout: float = 10.0) -> redis.Redis:
        """A synchronous client straight to the server (not through any proxy)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def info(self, section: str = "memory") -> dict[str, Any]:
        c = self.client()
        try:
            return dict(c.info(section))
        finally:
            c.close()

    def close(self) -> None:
        """Kill the server, wait for DEBUG SLEEP threads, delete the data dir."""
        self._reap(kill=True)
        for t in self._sleepers:
            t.join(timeout=15)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the proxy --------------------------------------------------------------------------------------------

MODES = ("pass", "reset", "blackhole", "drop_replies", "latency")


class _Pipe:
    """One proxied connection: client <-> server, two pumps, one delayed sender per direction."""

    def __init__(self, proxy: Proxy, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []
        self.deaf = False
        """Replies to this connection vanish (``Proxy.deafen_after`` matched one of its requests)."""

    def abort(self) -> None:
        """Close both sides with a TCP RST (SO_LINGER 0), as a crashed middlebox or a kernel would."""
        for w in (self.client, self.server):
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        for t in self.tasks:
            t.cancel()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bool) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                mode = self.proxy.mode
                if not reply:
                    self.proxy.match(self, data)
                if mode == "blackhole" or (reply and (mode == "drop_replies" or self.deaf)):
                    self.proxy.dropped += len(data)
                    continue
                delay = self.proxy.latency if mode == "latency" else 0.0
                queue.put_nowait((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))  # end of stream, after whatever is still delayed
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


class Proxy:
    """A TCP proxy 127.0.0.1:port -> 127.0.0.1:target_port with switchable faults (thread-safe controls)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode = "pass"
        self.latency = 0.0
        self.dropped = 0
        self.accepted = 0
        self.resets = 0
        self._deafen: list[bytes] = []
        self.deafened: list[float] = []
        """When each ``deafen_after`` pattern matched (monotonic)."""
        self._pipes: set[_Pipe] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("proxy did not start")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_forever()
        finally:
            self._ready.set()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "reset":
            self.resets += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target_port), 5.0
            )
        except (OSError, TimeoutError):
            _abort(writer)  # the server is down: the client sees a reset, as with no proxy at all
            return
        pipe = _Pipe(self, writer, up_writer)
        self._pipes.add(pipe)
        pipe.tasks = [
            asyncio.create_task(pipe.pump(reader, up_writer, reply=False)),
            asyncio.create_task(pipe.pump(up_reader, writer, reply=True)),
        ]
        try:
            await asyncio.gather(*pipe.tasks, return_exceptions=True)
        finally:
            self._pipes.discard(pipe)
            for w in (writer, up_writer):
                w.close()

    def _call(self, fn: Callable[[], Any]) -> Any:
        assert self._loop is not None
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                fut.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def set_mode(self, mode: str, *, latency: float = 0.0) -> float:
        """Switch mode for every chunk read from now on; return when (monotonic)."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}: one of {MODES}")

        def apply() -> None:
            self.latency = latency
            self.mode = mode

        self._call(apply)
        return time.monotonic()

    def deafen_after(self, pattern: bytes) -> None:
        """The next request containing ``pattern`` (once) makes its connection deaf: the server runs it, but
        it and whatever follows on that connection get no reply. The client times out and reconnects."""

        def apply() -> None:
            self._deafen.append(pattern)

        self._call(apply)

    def match(self, pipe: _Pipe, data: bytes) -> None:
        """On the proxy's loop: deafen ``pipe`` if ``data`` (a request) holds a ``deafen_after`` pattern."""
        for pattern in self._deafen:
            if pattern in data:
                self._deafen.remove(pattern)
                pipe.deaf = True
                self.deafened.append(time.monotonic())
                return

    def reset_all(self) -> int:
        """Reset every open connection now (both sides get a RST); return how many."""

        def apply() -> int:
            pipes = list(self._pipes)
            for p in pipes:
                p.abort()
            self.resets += len(pipes)
            return len(pipes)

        n: int = self._call(apply)
        return n

    @property
    def connections(self) -> int:
        return len(self._pipes)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        loop = self._loop

        def shutdown() -> None:
            for p in list(self._pipes):
                p.abort()
            if self._server is not None:
                self._server.close()
            loop.stop()

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout=10)


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- the invariant checker --------------------------------------------------------------------------------

TERMINAL = ("completed", "failed")


@dataclass
class Snapshot:
    """A queue's whole state, read in one MULTI/EXEC (no script can run in between)."""

    now_ms: int
    state: dict[str, str]
    wait: list[str]
    active: dict[str, float]
    delayed: dict[str, float]
    completed: dict[str, float]
    failed: dict[str, float]
    tokens: dict[str, str]
    attempts: dict[str, int]
    stalls: dict[str, int]
    jobs: set[str]
    results: dict[str, bytes]
    errors: dict[str, bytes]
    stats: dict[str, int]

    def failure_kind(self, job_id: str) -> str | None:
        raw = self.errors.get(job_id)
        return None if raw is None else _codec.decode_error(raw).kind


def _s(v: bytes) -> str:
    return v.decode("utf-8", "surrogateescape")


def _zmap(pairs: list[tuple[bytes, float]]) -> dict[str, float]:
    return {_s(k): float(v) for k, v in pairs}


def snapshot(client: redis.Redis, keys: QueueKeys) -> Snapshot:
    """Read every structure of one queue atomically (``client`` talks straight to the server)."""
    with client.pipeline(transaction=True) as p:
        p.time()
        p.hgetall(keys.state)
        p.lrange(keys.wait, 0, -1)
        p.zrange(keys.active, 0, -1, withscores=True)
        p.zrange(keys.delayed, 0, -1, withscores=True)
        p.zrange(keys.completed, 0, -1, withscores=True)
        p.zrange(keys.failed, 0, -1, withscores=True)
        p.hgetall(keys.tokens)
        p.hgetall(keys.attempts)
        p.hgetall(keys.stalls)
        p.hkeys(keys.jobs)
        p.hgetall(keys.results)
        p.hgetall(keys.errors)
        p.hgetall(keys.stats)
        r = p.execute()
    secs, micros = r[0]
    return Snapshot(
        now_ms=int(secs) * 1000 + int(micros) // 1000,
        state={_s(k): _s(v) for k, v in r[1].items()},
        wait=[_s(x) for x in r[2]],
        active=_zmap(r[3]),
        delayed=_zmap(r[4]),
        completed=_zmap(r[5]),
        failed=_zmap(r[6]),
        tokens={_s(k): _s(v) for k, v in r[7].items()},
        attempts={_s(k): int(v) for k, v in r[8].items()},
        stalls={_s(k): int(v) for k, v in r[9].items()},
        jobs={_s(k) for k in r[10]},
        results={_s(k): v for k, v in r[11].items()},
        errors={_s(k): v for k, v in r[12].items()},
        stats={_s(k): int(v) for k, v in r[13].items()},
    )


@dataclass
class Check:
    """What ``check`` found: counts for the report, and every broken invariant in words."""

    jobs: int = 0
    lost: int = 0
    completed: int = 0
    failed: int = 0
    failed_stalled: int = 0
    healthy_failed: int = 0
    """Jobs whose handler never raises that ended failed, whatever the reason: must be 0."""
    stalled_unexplained: int = 0
    """Jobs failed as stalled without having been in flight at more than ``max_stalls`` faults."""
    trimmed: int = 0
    """Acknowledged jobs that finished and were then trimmed by retention (seen by ``Finished``)."""
    completed_twice: int = 0
    over_attempts: int = 0
    over_stalls: int = 0
    active_without_lease: int = 0
    completed_max: int = 0
    """The most completed jobs the queue held at once (``Finished``'s largest reading, or the snapshot)."""
    failed_max: int = 0
    violations: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {
            "jobs": self.jobs,
            "lost": self.lost,
            "completed": self.completed,
            "failed": self.failed,
            "failed_stalled": self.failed_stalled,
            "healthy_failed": self.healthy_failed,
            "stalled_unexplained": self.stalled_unexplained,
            "trimmed": self.trimmed,
            "completed_twice": self.completed_twice,
            "over_attempts": self.over_attempts,
            "over_stalls": self.over_stalls,
            "active_without_lease": self.active_without_lease,
            "violations": len(self.violations),
        }


def check(
    snap: Snapshot,
    acknowledged: Iterable[str],
    *,
    max_attempts: int = 1,
    max_stalls: int = PROFILE.max_stalls,
    quiescent: bool = True,
    fresh_queue: bool = True,
    unhealthy: Iterable[str] = (),
    in_flight: Mapping[str, int] | None = None,
    finished: Finished | None = None,
    keep: int | None = None,
) -> Check:
    """Check the invariants of DESIGN.md on one snapshot.

    Always: every job is in exactly one structure matching its state (no half-states), the wait list holds
    no id twice, every active job has a lease (a deadline and a token), attempt and stall counters are within
    their limits. With ``quiescent``: every acknowledged add is in a terminal state (else it counts as lost).

    Every acknowledged job not in ``unhealthy`` is healthy (its handler never raises): it must end completed
    (``healthy_failed`` counts the others, each a violation). A job failed as "stalled" (healthy or not) must
    have been in flight at more than ``max_stalls`` faults: ``in_flight`` says at how many each job could have
    been (see ``in_flight``); without it, at none.

    ``finished`` (a ``Finished`` that watched the queue) vouches for jobs that are gone from Redis because
    retention trimmed them: they count as what it saw them end as, not as lost. With ``keep``, the finished
    sets must never have held more than ``keep`` jobs (at the snapshot, and at every reading of ``finished``).

    With ``fresh_queue`` (the queue was empty before the test): the lifetime ``completed`` counter equals the
    number of distinct jobs ever completed, so no job was ever completed twice.
    """
    c = Check()
    v = c.violations
    ack = list(dict.fromkeys(acknowledged))
    sick = set(unhealthy)
    faults_at = in_flight or {}
    c.jobs = len(ack)
    in_wait = Counter(snap.wait)
    for job_id, n in in_wait.items():
        if n > 1:
            v.append(f"{job_id} is in wait {n} times")
    places = {
        "waiting": set(in_wait),
        "active": set(snap.active),
        "delayed": set(snap.delayed),
        "completed": set(snap.completed),
        "failed": set(snap.failed),
    }
    for job_id in set(snap.state) | set().union(*places.values()):
        st = snap.state.get(job_id)
        where = [name for name, ids in places.items() if job_id in ids]
        if st is None:
            v.append(f"{job_id} is in {where} without a state")
            continue
        if where != [st]:
            v.append(f"{job_id} has state {st!r} but is in {where}")
        if job_id not in snap.jobs:
            v.append(f"{job_id} ({st}) has no envelope")
        if st == "active" and (job_id not in snap.active or job_id not in snap.tokens):
            c.active_without_lease += 1
            v.append(f"{job_id} is active without a lease")
        if st in ("waiting", "delayed") and job_id in snap.tokens:
            # complete and fail keep the token of the delivery that finished a job until it is trimmed (a
            # resent ack of that delivery is then recognised); a job waiting to run holds none (unless an
            # operator's retry_failed requeued it: its next claim replaces the token).
            v.append(f"{job_id} ({st}) still holds a token")
        if st == "completed" and job_id not in snap.results:
            v.append(f"{job_id} is completed without a result")
        if st == "failed" and job_id not in snap.errors:
            v.append(f"{job_id} is failed without an error")
    for job_id in snap.tokens:
        if job_id not in snap.state:
            v.append(f"{job_id} holds a token but is gone (its job was trimmed without it)")
    for job_id, n in snap.attempts.items():
        if n > max_attempts:
            c.over_attempts += 1
            v.append(f"{job_id} spent {n} attempts (limit {max_attempts})")
    for job_id, n in snap.stalls.items():
        if n > max_stalls + 1:
            c.over_stalls += 1
            v.append(f"{job_id} stalled {n} times (limit {max_stalls} + the final one)")
        elif n > max_stalls and snap.state.get(job_id) != "failed":
            c.over_stalls += 1
            v.append(f"{job_id} stalled {n} times but is {snap.state.get(job_id)!r}, not failed")
    unseen: list[str] = []
    for job_id in ack:
        st = snap.state.get(job_id)
        kind = snap.failure_kind(job_id) if st == "failed" else None
        if st is None and finished is not None and job_id in finished.outcome:
            st, kind = finished.outcome[job_id], finished.kinds.get(job_id)
            c.trimmed += 1
        if st == "completed":
            c.completed += 1
        elif st == "failed":
            c.failed += 1
            if job_id not in sick:
                c.healthy_failed += 1
                v.append(f"healthy job {job_id} ended failed ({kind}); healthy jobs must complete")
            if kind == "stalled":
                c.failed_stalled += 1
                hit = faults_at.get(job_id, 0)
                if hit <= max_stalls:
                    c.stalled_unexplained += 1
                    v.append(
                        f"{job_id} failed as stalled, but could have been in flight at {hit} fault(s) only "
                        f"(failing takes {max_stalls + 1})"
                    )
        elif quiescent and st is None and fresh_queue and finished is not None and finished.behind:
            unseen.append(job_id)  # gone from Redis, never seen finished: settled against the counters below
        elif quiescent:
            c.lost += 1
            v.append(f"acknowledged job {job_id} is {st!r}, not completed or failed")
    ever = set(snap.completed) | (finished.ever("completed") if finished is not None else set())
    if unseen:
        # The watcher samples every 20 ms; a burst of more than `keep` finishes (acks held back by an outage,
        # then flushed in one batch) can trim a job between two readings. Only a finished job is ever
        # trimmed, and every finish is counted once in stats by the script that records it: so as many unseen
        # jobs as there are finishes the watcher did not see are vouched for, and no more. A job lost while
        # another finished twice would cancel out here; fencing makes a double finish impossible, and
        # `completed_twice` below still compares the counter with the distinct jobs.
        assert finished is not None  # only a watched queue has unseen jobs
        failed_ever = set(snap.failed) | finished.ever("failed")
        spare_done = snap.stats.get("completed", 0) - len(ever)
        spare_failed = snap.stats.get("failed", 0) - len(failed_ever)
        for job_id in unseen:
            if spare_done > 0:
                spare_done -= 1
                ever.add(job_id)
                c.completed += 1
                c.trimmed += 1
            elif spare_failed > 0:
                spare_failed -= 1
                c.failed += 1
                c.trimmed += 1
                if job_id not in sick:
                    c.healthy_failed += 1
                    v.append(f"healthy job {job_id} may have ended failed (trimmed unseen)")
            else:
                c.lost += 1
                v.append(
                    f"acknowledged job {job_id} is gone, was never seen finished, and the counters hold no "
                    f"finish unaccounted for (the Finished watcher fell behind {finished.behind} times)"
                )
    if fresh_queue:
        c.completed_twice = max(0, snap.stats.get("completed", 0) - len(ever))
        if c.completed_twice:
            v.append(
                f"stats.completed = {snap.stats.get('completed', 0)} but {len(ever)} distinct jobs were "
                "completed: some job was completed twice"
            )
    c.completed_max = max(len(snap.completed), finished.max_completed if finished else 0)
    c.failed_max = max(len(snap.failed), finished.max_failed if finished else 0)
    if keep is not None:
        for name, most in (("completed", c.completed_max), ("failed", c.failed_max)):
            if most > keep:
                v.append(f"the {name} set held {most} jobs at once; retention keeps {keep}")
    return c


# -- finished jobs, whatever retention trimmed --------------------------------------------------------------


class Finished:
    """Every job seen completed or failed in one queue, by a thread reading its finished sets every 20 ms.

    Retention deletes every record of the oldest finished jobs once a set holds more than its keep count, so
    a final snapshot cannot tell a trimmed job from a lost one. This ledger can: a finished job stays in its
    set until ``keep`` more jobs finished after it (25 jobs at 160 jobs/s: 150 ms, several readings). It also
    records the largest size each set reached. ``behind`` counts readings between which more than ``keep``
    jobs finished (some may have come and gone unseen); ``check`` then says so beside any job it calls lost.
    It reads straight from the server (never through a proxy); while the server is down it keeps trying.
    """

    def __init__(self, server: ValkeyServer, keys: QueueKeys, *, keep: int | None, interval: float = 0.02):
        self.server = server
        self.keys = keys
        self.keep = keep
        self.interval = interval
        self.outcome: dict[str, str] = {}
        """Job id -> ``completed`` or ``failed``, as first seen."""
        self.kinds: dict[str, str | None] = {}
        """Failed job id -> its failure kind."""
        self.max_completed = 0
        self.max_failed = 0
        self.readings = 0
        self.behind = 0
        self._last: tuple[int, int] | None = None
        self._since: tuple[float, float] = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None

    def __enter__(self) -> Finished:
        self._client = self.server.client(timeout=1.0)
        self._thread = threading.Thread(target=self._run, name="finished-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(last_reading=exc_type is None)

    def stop(self, *, last_reading: bool = True) -> None:
        """Stop the thread, after one last reading (which must succeed: the server is up by then) unless the
        test is failing already (then the server may be down, and the test's own error is the one to see)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None
        assert self._client is not None
        try:
            if last_reading:
                self.read()
        finally:
            self._client.close()

    def ever(self, state: str) -> set[str]:
        return {i for i, s in list(self.outcome.items()) if s == state}

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError, OSError):
                self.read()
            self._stop.wait(self.interval)

    def read(self) -> None:
        """One reading, in one MULTI: what entered each finished set since the last reading (a set is scored
        by finishing time, server clock), both sizes and the lifetime counters."""
        assert self._client is not None
        k = self.keys
        with self._client.pipeline(transaction=True) as p:
            p.zrangebyscore(k.completed, self._since[0], "+inf", withscores=True)
            p.zrangebyscore(k.failed, self._since[1], "+inf", withscores=True)
            p.zcard(k.completed)
            p.zcard(k.failed)
            p.hmget(k.stats, ["completed", "failed"])
            done_scored, failed_scored, n_in_done, n_in_failed, (n_done, n_failed) = p.execute()
        done = [raw for raw, _ in done_scored]
        failed = [raw for raw, _ in failed_scored]
        self._since = (
            max([self._since[0], *(score for _, score in done_scored)]),
            max([self._since[1], *(score for _, score in failed_scored)]),
        )
        counts = (int(n_done or 0), int(n_failed or 0))
        last = self._last
        if self.keep is not None and last is not None:
            self.behind += counts[0] - last[0] > self.keep or counts[1] - last[1] > self.keep
        self._last = counts
        self.readings += 1
        self.max_completed = max(self.max_completed, int(n_in_done))
        self.max_failed = max(self.max_failed, int(n_in_failed))
        for raw in done:
            self.outcome.setdefault(_s(raw), "completed")
        new = [raw for raw in failed if _s(raw) not in self.outcome]
        if new:
            errors = self._client.hmget(k.errors, new)
            for raw, err in zip(new, errors, strict=True):
                self.outcome[_s(raw)] = "failed"
                self.kinds[_s(raw)] = None if err is None else _codec.decode_error(err).kind


# -- faults and the jobs they could hit ---------------------------------------------------------------------


@dataclass(frozen=True)
class FaultWindow:
    """A fault from ``start`` to ``end`` (monotonic), on one worker process (``pid``) or on all (None)."""

    kind: str
    start: float
    end: float
    pid: int | None = None


LINGER = SOCKET_TIMEOUT + PROFILE.lease_ttl
"""How long after a fault is healed it can still hit a job: a connection it silenced is found dead at the
socket timeout, and a lease starved of renewals meanwhile lapses up to a lease later."""
ACK_SLACK = 1.0
"""A handler that returned this long before a fault began had its completion recorded before it."""


def deaths(led: Ledger, job_ids: Iterable[str]) -> list[FaultWindow]:
    """A worker death for each run of these jobs (poison jobs: each start SIGKILLs its own process)."""
    wanted = set(job_ids)
    return [FaultWindow("poison", e.t, e.t, e.pid) for e in led.events("start") if e.job in wanted]


def in_flight(led: Ledger, faults: Iterable[FaultWindow], added: Mapping[str, float]) -> Counter[str]:
    """At how many of ``faults`` each job could have been in flight (claimed, running, or acking).

    ``added``: job id -> when its add was first tried (monotonic). Generous by design (it bounds what a fault
    may do): a job counts at a fault unless it was added after the fault's effects were over (``LINGER``
    after its end), or its handler returned ``ACK_SLACK`` before the fault began and it never started again
    until the fault was over. A fault on one worker counts only jobs whose last start before it was on that
    worker, or that had not started anywhere yet (claimed there, maybe, but not started).
    """
    starts: dict[str, list[tuple[float, int]]] = {}
    ends: dict[str, list[float]] = {}
    for e in led.entries:
        if e.job is None:
            continue
        if e.event == "start":
            starts.setdefault(e.job, []).append((e.t, e.pid))
        elif e.event == "end":
            ends.setdefault(e.job, []).append(e.t)
    faults = list(faults)
    out: Counter[str] = Counter()
    for job_id, t_add in added.items():
        job_starts = starts.get(job_id, [])
        job_ends = ends.get(job_id, [])
        for f in faults:
            over = f.end + LINGER
            if t_add > over:
                continue
            done_at = max((t for t in job_ends if t < f.start - ACK_SLACK), default=None)
            if done_at is not None and not any(done_at < t <= over for t, _ in job_starts):
                continue
            if f.pid is not None:
                before = [pid for t, pid in job_starts if t <= f.end]
                if before and before[-1] != f.pid:
                    continue
            out[job_id] += 1
    return out


# -- figures ----------------------------------------------------------------------------------------------


class Figures(dict[str, Any]):
    """One test's figures; ``emit`` prints them as one JSON line (and appends it to the report file)."""

    def __init__(self, test: str, **figures: Any) -> None:
        super().__init__(test=test, **figures)

    def emit(self) -> None:
        line = json.dumps(self, default=_jsonable, sort_keys=False)
        print(line)
        path = os.environ.get("QFLOW_FAULTS_REPORT")
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value)
    if isinstance(value, msgspec.Struct):
        return msgspec.to_builtins(value)
    return str(value)


def seconds(value: float | None) -> float | None:
    """Round a duration for the report."""
    return None if value is None else round(value, 3)


# -- steady load ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One job a ``Load`` adds: its processor, payload and ``add()`` keywords (``delay=``, ``attempts=``)."""

    name: str
    payload: Any
    options: Mapping[str, Any] = field(default_factory=dict)


class Load:
    """A producer adding jobs at a steady rate, each with an id made before its first try.

    An add that fails (the server is down, the connection was cut) is retried with the same id until it is
    acknowledged: ``add(job_id=...)`` is idempotent, so a write that landed before its reply was lost is
    not made twice. Only acknowledged adds are the checker's business (``acknowledged``). ``make`` returns a
    payload for processor ``name``, or a ``Spec`` (kept in ``specs``).
    """

    def __init__(
        self, queue: qflow.Queue, make: Callable[[], Any], *, rate: float, name: str, tag: str = "j"
    ) -> None:
        self.queue = queue
        self.make = make
        self.rate = rate
        self.name = name
        self.tag = tag
        self.acknowledged: list[str] = []
        self.acked_at: dict[str, float] = {}
        self.tried_at: dict[str, float] = {}
        """When each job's add was first tried (monotonic): a retried add may have landed at its first try."""
        self.specs: dict[str, Spec] = {}
        self.failures = 0
        self.errors: Counter[str] = Counter()
        self.slowest_add = 0.0
        self._n = 0

    async def run(self, stop: asyncio.Event, *, retry_for: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        period = 1.0 / self.rate
        next_at = loop.time()
        while not stop.is_set():
            self._n += 1
            job_id = f"{self.tag}{self._n:06d}"
            made = self.make()
            spec = made if isinstance(made, Spec) else Spec(self.name, made)
            if isinstance(made, Spec):
                self.specs[job_id] = made
            give_up = loop.time() + retry_for
            self.tried_at[job_id] = time.monotonic()
            while True:
                t = loop.time()
                try:
                    await self.queue.add(spec.name, spec.payload, job_id=job_id, **spec.options)
                except qflow.BrokerUnavailable as exc:
                    self.failures += 1
                    self.errors[type(exc.__cause__).__name__] += 1
                    if stop.is_set() or loop.time() > give_up:
                        return  # never acknowledged: not the checker's business
                    await asyncio.sleep(0.05)
                    continue
                now = loop.time()
                self.slowest_add = max(self.slowest_add, now - t)
                self.acknowledged.append(job_id)
                self.acked_at[job_id] = time.monotonic()
                break
            next_at = max(next_at + period, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))

    def after(self, t: float) -> list[str]:
        """Ids acknowledged after ``t`` (monotonic)."""
        return [i for i in self.acknowledged if self.acked_at[i] > t]


def completions(client: redis.Redis, keys: QueueKeys) -> int:
    """Jobs the queue ever completed (its lifetime counter: the completed set stops growing at its keep)."""
    return int(client.hget(keys.stats, "completed") or 0)


def progressed(client: redis.Redis, keys: QueueKeys, by: int) -> Callable[[], bool]:
    """A predicate: ``by`` more jobs of the queue completed from now."""
    start = completions(client, keys)
    return lambda: completions(client, keys) >= start + by


def elapsed(since: float, seconds: float) -> Callable[[], bool]:
    """A predicate: ``seconds`` have passed since ``since`` (monotonic): for holding a fault that long."""
    return lambda: time.monotonic() - since >= seconds


async def poll(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll ``predicate`` (sync or async) until it is truthy; return when (monotonic), or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
