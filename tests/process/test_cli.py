"""The operator commands as a user runs them: ``python -m qflow status | info | jobs | worker --help``."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import qflow
from qflow import _embedded
from qflow._cli.exitcodes import MEANING, ExitCode
from qflow.testing import drain
from tests.process import fleet_app
from tests.process.fleet_app import TARGET, Fleet


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
        assert {"host", "in_flight", "running", "claimed_ahead", "jobs_done", "started_at", "name"} <= set(w)
    table = fleet.cli("status", TARGET)
    assert table.returncode == 0
    assert "RUNNING  AHEAD" in table.stdout
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
    assert await work.counts() == {
        "waiting": 0,
        "active": 0,
        "delayed": 0,
        "completed": 0,
        "failed": 0,
        "expired": 0,
    }


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


# -- without module:app, running vs claimed ahead, target hints (issue 10) ---------------------------------


async def test_info_without_module_app_lists_the_queues_found_in_redis(
    fleet: Fleet, app: qflow.App, redis_url: str, prefix: str
) -> None:
    """``qflow info --url U --prefix P`` (no module:app) lists each queue that had a job, with its counts."""
    work = app.queues["work"]
    await work.add_bulk([qflow.JobSpec("sleep", 0.0) for _ in range(3)])
    await work.add("sleep", 0.0, delay=3600)
    out = fleet.cli("info", "--url", redis_url, "--prefix", prefix, "--json")
    assert out.returncode == 0, out.stderr
    info = {q["queue"]: q for q in json.loads(out.stdout)}
    assert list(info) == ["work"]  # "other" is declared by the app but never had a job
    w = info["work"]
    assert (w["waiting"], w["active"], w["delayed"], w["running"], w["claimed_ahead"]) == (3, 0, 1, 0, 0)
    table = fleet.cli("info", "--prefix", prefix, env={"QFLOW_REDIS_URL": redis_url})
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].split()[:3] == ["work", "3", "0"]
    typo = fleet.cli("info", "--url", redis_url, "--prefix", prefix, "-q", "wrok")
    assert typo.returncode == ExitCode.CONFIG
    assert f"no queue named 'wrok' under prefix {prefix!r}; found: work" in typo.stderr
    status = fleet.cli("status", "--url", redis_url, "--prefix", prefix, "--json")
    assert (status.returncode, json.loads(status.stdout)) == (0, [])


async def test_jobs_list_shows_the_ids_of_one_state(
    fleet: Fleet, app: qflow.App, redis_url: str, prefix: str
) -> None:
    """``jobs list STATE`` prints the ids in that state, next to run or newest first, --limit per queue."""
    work = app.queues["work"]
    bad = await work.add("boom", "kaput")
    await drain(app, ["work"])
    for i in range(3):
        await work.add("sleep", 0.0, job_id=f"next-{i}")
    where = ("--url", redis_url, "--prefix", prefix)
    failed = fleet.cli("jobs", "list", "failed", *where)
    assert failed.returncode == 0, failed.stderr
    assert "failed jobs of queue 'work': 1 (newest first)" in failed.stdout
    assert bad.id in failed.stdout
    listed = fleet.cli("jobs", *where, "list", "waiting", "--limit", "2", "--json")
    assert listed.returncode == 0, listed.stderr
    [waiting] = json.loads(listed.stdout)
    assert (waiting["queue"], waiting["state"], waiting["total"]) == ("work", "waiting", 3)
    assert [j["id"] for j in waiting["jobs"]] == ["next-0", "next-1"]
    with_app = fleet.cli("jobs", TARGET, "list", "failed", "-q", "work", "--json")
    assert with_app.returncode == 0, with_app.stderr
    [jl] = json.loads(with_app.stdout)
    assert [j["id"] for j in jl["jobs"]] == [bad.id]
    assert jl["jobs"][0]["at"] > 0
    table = fleet.cli("jobs", TARGET, "list", "waiting", "--limit", "1")
    assert "waiting jobs of queue 'work': 1 of 3 (next to run first)" in table.stdout
    assert "waiting jobs of queue 'other': 0" in table.stdout
    assert "--limit N for more" in table.stdout


async def test_status_and_info_show_running_apart_from_claimed_ahead(
    fleet: Fleet, app: qflow.App, redis_url: str, prefix: str
) -> None:
    """Jobs claimed ahead of a free lane are shown apart from running ones, which never exceed concurrency."""
    sup = fleet.start("-p", "1", "-c", "2", "-q", "work")
    await sup.wait_ready(1)
    await app.queues["work"].add_bulk([qflow.JobSpec("sleep", 0.2) for _ in range(60)])
    seen: list[dict[str, int]] = []

    def both_seen() -> bool:
        out = fleet.cli("status", TARGET, "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        for w in rows:
            seen.append({"running": w["running"], "claimed_ahead": w["claimed_ahead"]})
            assert w["running"] <= 2, rows  # only `sleep` has jobs: its 2 lanes are all that can run
            assert w["load"]["work"] == {"running": w["running"], "claimed_ahead": w["claimed_ahead"]}
        return any(w["running"] == 2 and w["claimed_ahead"] > 0 for w in rows)

    await fleet.until(both_seen, timeout=20, what="2 running and some claimed ahead", sup=sup)
    table = fleet.cli("status", "--url", redis_url, "--prefix", prefix)
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[6:8] == ["RUNNING", "AHEAD"]
    assert "running, " in table.stdout
    assert "claimed ahead" in table.stdout
    info = {q["queue"]: q for q in json.loads(fleet.cli("info", TARGET, "--json").stdout)}
    assert info["work"]["running"] <= 2
    assert all(s["running"] <= 2 for s in seen)


async def test_without_module_app_or_a_running_server_nothing_is_started(
    fleet: Fleet, tmp_path: Path
) -> None:
    """No module:app, no URL and no embedded server running: a clear error, and no server started to read."""
    home = tmp_path / "home"
    out = fleet.cli("status", env={"QFLOW_EMBEDDED": "1", "QFLOW_HOME": str(home), "REDIS_URL": ""})
    assert out.returncode == ExitCode.UNAVAILABLE
    assert "this project's embedded server is not running" in out.stderr
    assert not (home / "valkey.pid").exists()
    off = fleet.cli("jobs", "list", "failed", env={"REDIS_URL": ""})  # the fleet's env: QFLOW_EMBEDDED=0
    assert off.returncode == ExitCode.CONFIG
    assert "give module:app or --url URL" in off.stderr


async def test_info_without_module_app_reads_the_running_embedded_server(
    fleet: Fleet, tmp_path: Path
) -> None:
    """With the project's embedded server running and no URL anywhere, info and jobs list read it."""
    server = _embedded.server_for(tmp_path / "home")
    _embedded.ensure_running(server)
    try:
        producer = qflow.App(server.url)
        try:
            job = await producer.queue("mail").add("send", {"to": "a@example.com"})
        finally:
            await producer.close()
        env = {"QFLOW_EMBEDDED": "1", "QFLOW_HOME": str(server.home), "REDIS_URL": ""}
        out = fleet.cli("info", "--json", env=env)
        assert out.returncode == 0, out.stderr
        assert [(q["queue"], q["waiting"]) for q in json.loads(out.stdout)] == [("mail", 1)]
        listed = fleet.cli("jobs", "list", "waiting", env=env)
        assert job.id in listed.stdout
        assert listed.stderr.count("using the embedded Valkey server") == 1
    finally:
        _embedded.stop(server)


@pytest.mark.parametrize(
    ("target", "hint"),
    [
        ("tests.process.fleet_app:ap", "has no attribute 'ap'; did you mean 'app'?"),
        ("tests/process/fleet_app.py:app", "did you mean 'tests.process.fleet_app:app'?"),
        ("tests.process.fleet_app.py:app", "drop the '.py': did you mean 'tests.process.fleet_app:app'?"),
    ],
)
def test_a_mistyped_target_gets_the_name_meant(fleet: Fleet, target: str, hint: str) -> None:
    """A typo, a ``.py`` or a file path in the target exits BAD_TARGET naming the target meant."""
    out = fleet.cli("status", target)
    assert out.returncode == ExitCode.BAD_TARGET
    assert hint in out.stderr
