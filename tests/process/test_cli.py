"""The operator commands as a user runs them: ``python -m qflow status | info | jobs | worker --help``."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import qflow
from qflow._exitcodes import MEANING, ExitCode
from qflow.testing import drain
from tests.process import fleet_app
from tests.process.fleet_app import TARGET, Fleet


@pytest.fixture
def fleet(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    """Supervisors and commands on the test server and prefix; every process killed and reaped afterwards."""
    f = Fleet(redis_url, prefix, tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture
async def app(redis_url: str, prefix: str) -> AsyncIterator[qflow.App]:
    """The producer side of ``fleet_app``."""
    a = fleet_app.build(redis_url, prefix)
    yield a
    await a.close()


async def test_status_json_lists_every_worker_process_with_its_heartbeat(fleet: Fleet) -> None:
    """``qflow status --json`` lists each child of a supervisor: pid, host, queues, concurrency, counters."""
    sup = fleet.start("-p", "2", "-c", "3")
    pids = await sup.wait_ready(2)

    def listed() -> list[dict[str, object]]:
        out = fleet.cli("status", TARGET, "--json")
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, object]] = json.loads(out.stdout)
        return rows

    await fleet.until(lambda: {w["pid"] for w in listed()} == pids, timeout=10, what="both registered")
    rows = listed()
    for w in rows:
        assert w["supervisor_pid"] == sup.pid
        assert w["queues"] == {"work": 15, "other": 3}
        assert w["concurrency"] == 18
        assert w["state"] == "running"
        assert w["target"] == TARGET
        assert {"host", "in_flight", "jobs_done", "started_at", "last_seen", "name"} <= set(w)
    table = fleet.cli("status", TARGET)
    assert table.returncode == 0
    assert "IN FLIGHT" in table.stdout
    assert "2 worker process(es) on 1 host(s): 36 slots" in table.stdout


async def test_stopped_workers_leave_the_fleet_list(fleet: Fleet) -> None:
    """A worker that stops gracefully deregisters at once."""
    sup = fleet.start("-p", "1")
    await sup.wait_ready(1)
    await fleet.until(
        lambda: json.loads(fleet.cli("status", TARGET, "--json").stdout) != [], timeout=10, what="listed"
    )
    sup.send(signal.SIGTERM)
    assert await sup.wait_exit(10) == 0
    assert json.loads(fleet.cli("status", TARGET, "--json").stdout) == []


async def test_info_json_counts_jobs_per_queue_and_measures_throughput(fleet: Fleet, app: qflow.App) -> None:
    """``qflow info --json``: waiting, active, delayed, completed, failed per queue, and jobs per second."""
    work = app.queues["work"]
    await work.add_bulk([qflow.JobSpec("sleep", 0.0) for _ in range(5)] + [qflow.JobSpec("boom", "x")])
    done = fleet.cli(
        "worker", TARGET, "--in-process", "--burst", "-q", "work", env={"QFLOW_LOG_LEVEL": "ERROR"}
    )
    assert done.returncode == 0, done.stderr
    await work.add("sleep", 0.0)
    await work.add("sleep", 0.0, delay=3600)  # after the burst run: --burst waits for delayed jobs too
    out = fleet.cli("info", TARGET, "--json")
    assert out.returncode == 0, out.stderr
    info = {q["queue"]: q for q in json.loads(out.stdout)}
    w = info["work"]
    assert (w["waiting"], w["active"], w["delayed"], w["completed"], w["failed"]) == (1, 0, 1, 5, 1)
    assert w["completed_per_s"] == pytest.approx(5 / 60, abs=0.01)
    assert w["totals"]["completed"] == 5
    assert info["other"]["waiting"] == 0
    table = fleet.cli("info", TARGET, "-q", "work")
    assert "COMPLETED" in table.stdout
    assert "other" not in table.stdout


async def test_jobs_show_retry_and_purge(fleet: Fleet, app: qflow.App) -> None:
    """A failed job is shown with its error, retried with fresh attempts; purge needs --yes without a tty."""
    work = app.queues["work"]
    job = await work.add("boom", "kaput")
    await drain(app, ["work"])
    shown = fleet.cli("jobs", TARGET, "show", "work", job.id, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert (data["state"], data["name"], data["payload"]) == ("failed", "boom", "kaput")
    assert data["error"]["type"] == "ValueError"
    assert data["attempts_spent"] == 1
    text = fleet.cli("jobs", TARGET, "show", "work", job.id)
    assert "ValueError: kaput" in text.stdout

    retried = fleet.cli("jobs", TARGET, "retry", "work", job.id)
    assert retried.returncode == 0, retried.stderr
    assert "requeued 1 job(s)" in retried.stdout
    assert await job.status() == qflow.State.WAITING
    again = json.loads(fleet.cli("jobs", TARGET, "show", "work", job.id, "--json").stdout)
    assert (again["attempts_spent"], again["error"]) == (0, None)
    not_failed = fleet.cli("jobs", TARGET, "retry", "work", job.id, "nope")
    assert not_failed.returncode == ExitCode.NOT_FOUND
    assert "1 not failed" in not_failed.stdout

    await drain(app, ["work"])
    await work.add("boom", "again")
    await drain(app, ["work"])
    everything = fleet.cli("jobs", TARGET, "retry", "work", "--all-failed", "--json")
    assert json.loads(everything.stdout)["requeued"] == 2
    assert (await work.counts())["waiting"] == 2

    refused = fleet.cli("jobs", TARGET, "purge", "work")
    assert refused.returncode == ExitCode.USAGE
    assert "without --yes" in refused.stderr
    assert (await work.counts())["waiting"] == 2
    purged = fleet.cli("jobs", TARGET, "purge", "work", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert await work.counts() == {"waiting": 0, "active": 0, "delayed": 0, "completed": 0, "failed": 0}


async def test_jobs_show_of_an_unknown_id_exits_not_found(fleet: Fleet) -> None:
    """``jobs show`` of an id that does not exist says so and exits NOT_FOUND (6)."""
    out = fleet.cli("jobs", TARGET, "show", "work", "no-such-id")
    assert out.returncode == ExitCode.NOT_FOUND
    assert "no job 'no-such-id'" in out.stderr


@pytest.mark.parametrize("command", ["status", "info"])
def test_bad_target_of_a_one_shot_command_is_one_line_and_exit_3(fleet: Fleet, command: str) -> None:
    """``qflow status nope:app`` prints one precise line and exits BAD_TARGET."""
    out = fleet.cli(command, "tests.process.nope:app")
    assert out.returncode == ExitCode.BAD_TARGET
    assert out.stderr.strip().splitlines() == [
        "qflow: error: cannot load 'tests.process.nope:app': no module named 'tests.process.nope' "
        "(is the project's directory the current one, or on PYTHONPATH?)"
    ]


def test_unreachable_redis_exits_unavailable(fleet: Fleet) -> None:
    """A one-shot command against a dead server fails fast with UNAVAILABLE (5)."""
    out = fleet.cli("status", TARGET, env={"FLEET_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert out.returncode == ExitCode.UNAVAILABLE
    assert out.stderr.startswith("qflow: error: ")


def test_worker_help_documents_flags_signals_and_every_exit_code(fleet: Fleet) -> None:
    """``python -m qflow worker --help`` shows the flags, the signals and each exit code with its meaning."""
    out = fleet.cli("worker", "--help")
    assert out.returncode == 0
    for flag in ("--processes", "--concurrency", "--burst", "--max-memory-per-child", "--no-log-config"):
        assert flag in out.stdout
    assert "SIGTTIN" in out.stdout
    for code in ExitCode:
        assert f"{int(code):<3} {code.name}" in out.stdout
        assert MEANING[code][:30] in " ".join(out.stdout.split())


def test_bad_flag_is_an_argparse_usage_error(fleet: Fleet) -> None:
    """An invalid option value exits 2 with argparse's usage line, before anything starts."""
    out = fleet.cli("worker", TARGET, "-p", "0")
    assert out.returncode == ExitCode.USAGE
    assert out.stderr.startswith("usage: qflow worker")
    assert "must be >= 1" in out.stderr
    env = fleet.cli("worker", TARGET, env={"QFLOW_CONCURRENCY": "lots"})
    assert env.returncode == ExitCode.USAGE
    assert "QFLOW_CONCURRENCY='lots'" in env.stderr
