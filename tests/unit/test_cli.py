"""The ``qflow`` command's parsing, exit codes and target loading, without a server or a subprocess."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from qflow._cli import supervisor
from qflow._cli.child import ChildConfig, loop_runner
from qflow._cli.exitcodes import MEANING, ExitCode, describe_exit
from qflow._cli.guards import rss_bytes
from qflow._cli.importer import BadTarget, load_app, split_target
from qflow._cli.logs import configure_logging
from qflow._cli.parser import COMMON_ENV, JOB_STATES, WORKER_ENV, parse_args
from qflow._inspect import JOB_LIST_STATES
from qflow.exceptions import ConfigurationError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str] | None = None
) -> str:
    """Parse ``argv``; assert argparse exited 2 and return its message."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env or {})
    assert exc.value.code == ExitCode.USAGE
    return capsys.readouterr().err


def test_worker_defaults() -> None:
    """Without flags or variables: one supervised process, processors' own concurrency, INFO logs."""
    args = parse_args(["worker", "pkg.mod:app"], {})
    assert (args.target, args.processes, args.concurrency, args.queues) == ("pkg.mod:app", 1, None, None)
    assert (args.burst, args.in_process, args.no_log_config) == (False, False, False)
    assert (args.drain_timeout, args.max_jobs_per_child, args.max_memory_per_child) == (None, None, None)
    assert (args.log_level, args.hang_timeout) == ("INFO", 30.0)


def test_every_worker_flag_parses() -> None:
    """Each documented flag lands in its option, -w is -p, and -q accumulates."""
    args = parse_args(
        [
            "worker",
            "m:app",
            "-w",
            "4",
            "-c",
            "10",
            "-q",
            "a",
            "b",
            "-q",
            "c",
            "--burst",
            "--drain-timeout",
            "2.5",
            "--max-jobs-per-child",
            "100",
            "--max-memory-per-child",
            "512",
            "--hang-timeout",
            "5",
            "--log-level",
            "debug",
            "--no-log-config",
        ],
        {},
    )
    assert (args.processes, args.concurrency, args.queues) == (4, 10, ["a", "b", "c"])
    assert (args.burst, args.drain_timeout, args.max_jobs_per_child) == (True, 2.5, 100)
    assert (args.max_memory_per_child, args.hang_timeout, args.log_level, args.no_log_config) == (
        512.0,
        5.0,
        "DEBUG",
        True,
    )


def test_flags_fall_back_to_qflow_variables_and_flags_win() -> None:
    """``QFLOW_*`` variables fill options not given on the command line; a flag beats its variable."""
    env = {
        "QFLOW_PROCESSES": "3",
        "QFLOW_CONCURRENCY": "7",
        "QFLOW_QUEUES": "email, images  reports",
        "QFLOW_BURST": "yes",
        "QFLOW_DRAIN_TIMEOUT": "12",
        "QFLOW_MAX_JOBS_PER_CHILD": "50",
        "QFLOW_MAX_MEMORY_PER_CHILD": "256",
        "QFLOW_HANG_TIMEOUT": "9",
        "QFLOW_LOG_LEVEL": "warning",
        "QFLOW_NO_LOG_CONFIG": "1",
    }
    args = parse_args(["worker", "m:app"], env)
    assert (args.processes, args.concurrency, args.queues) == (3, 7, ["email", "images", "reports"])
    assert (args.burst, args.drain_timeout, args.max_jobs_per_child, args.max_memory_per_child) == (
        True,
        12.0,
        50,
        256.0,
    )
    assert (args.hang_timeout, args.log_level, args.no_log_config) == (9.0, "WARNING", True)
    args = parse_args(["worker", "m:app", "-p", "1", "-c", "2"], env)
    assert (args.processes, args.concurrency) == (1, 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "m:app", "-p", "0"], "must be >= 1"),
        (["worker", "m:app", "-p", "1025"], "must be <= 1024"),
        (["worker", "m:app", "-w", "100000"], "must be <= 1024"),
        (["worker", "m:app", "-c", "100001"], "must be <= 100,000"),
        (["worker", "m:app", "-p", "2", "-w", "3"], "not allowed with argument"),
        (["worker", "m:app", "-c", "x"], "invalid int value"),
        (["worker", "m:app", "--drain-timeout", "-1"], "finite number >= 0"),
        (["worker", "m:app", "--max-memory-per-child", "0"], "> 0 MB"),
        (["worker", "m:app", "--log-level", "loud"], "invalid choice"),
        (["worker", "m:app", "-p", "2", "--in-process"], "--in-process runs one worker"),
        (["worker"], "the following arguments are required: module:app"),
        (["jobs", "m:app", "retry", "q"], "give job ids or --all-failed"),
        (["jobs", "m:app", "retry", "q", "id1", "--all-failed"], "give job ids or --all-failed"),
        (["bogus"], "invalid choice"),
        (["status", "m:app", "--url", "redis://h/0"], "--url and --prefix are for use without module:app"),
        (["jobs", "m:app", "--prefix", "p", "list", "failed"], "--url and --prefix are for use without"),
        (["info", "--prefix", "a{b}"], "invalid key prefix"),
        (["jobs", "list", "done"], "invalid choice: 'done'"),
        (["jobs", "list", "failed", "--limit", "0"], "must be >= 1"),
    ],
)
def test_bad_command_lines_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """A bad flag value or combination exits 2 with argparse's usage message naming the problem."""
    err = usage_error(capsys, argv)
    assert err.startswith("usage: qflow")
    assert message in err


@pytest.mark.parametrize(
    ("var", "value"),
    [("QFLOW_PROCESSES", "many"), ("QFLOW_BURST", "perhaps"), ("QFLOW_DRAIN_TIMEOUT", "soon")],
)
def test_bad_variable_is_a_usage_error_naming_it(
    capsys: pytest.CaptureFixture[str], var: str, value: str
) -> None:
    """A ``QFLOW_*`` variable that does not parse is reported like a bad flag, with its name and value."""
    err = usage_error(capsys, ["worker", "m:app"], {var: value})
    assert f"environment variable {var}={value!r}" in err


def test_one_shot_commands_parse() -> None:
    """status, info, jobs verbs and scale take their arguments; relative counts like -2 are positional."""
    assert parse_args(["status", "m:app", "--json"], {}).json is True
    assert parse_args(["info", "m:app", "-q", "a"], {}).queues == ["a"]
    show = parse_args(["jobs", "m:app", "show", "email", "42"], {})
    assert (show.verb, show.queue, show.job_id) == ("show", "email", "42")
    assert parse_args(["jobs", "m:app", "retry", "email", "--all-failed"], {}).all_failed is True
    assert parse_args(["jobs", "m:app", "purge", "email", "-y"], {}).yes is True
    scale = parse_args(["scale", "1234", "-2", "--wait"], {})
    assert (scale.which, scale.count, scale.wait) == ("1234", "-2", True)


def test_status_info_and_jobs_parse_without_a_target() -> None:
    """Without module:app, status / info / jobs take --url and --prefix; a jobs verb is never the target."""
    status = parse_args(["status", "--url", "redis://h:6379/0", "--prefix", "shop", "--json"], {})
    assert (status.target, status.url, status.prefix, status.json) == (None, "redis://h:6379/0", "shop", True)
    info = parse_args(["info", "-q", "email"], {})
    assert (info.target, info.url, info.prefix, info.queues) == (None, None, None, ["email"])
    listing = parse_args(["jobs", "--log-level", "debug", "list", "failed", "-q", "a", "--limit", "5"], {})
    assert (listing.target, listing.verb, listing.state) == (None, "list", "failed")
    assert (listing.queues, listing.limit, listing.json) == (["a"], 5, False)
    show = parse_args(["jobs", "--url", "redis://h/0", "show", "email", "42"], {})
    assert (show.target, show.verb, show.queue, show.job_id) == (None, "show", "email", "42")
    with_app = parse_args(["jobs", "m:app", "list", "waiting", "--json"], {})
    assert (with_app.target, with_app.state, with_app.limit, with_app.json) == ("m:app", "waiting", 20, True)


def test_job_states_of_the_parser_are_those_the_reader_knows() -> None:
    """``qflow jobs list STATE`` offers the very states ``list_jobs`` reads (a copy: spares an import)."""
    assert JOB_STATES == JOB_LIST_STATES


def test_describe_exit_decodes_signals_and_codes() -> None:
    """Exit statuses read like gunicorn's: the signal's name, a hint on SIGKILL, the code's meaning."""
    assert describe_exit(-signal.SIGKILL).startswith("killed by SIGKILL — possible out-of-memory")
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"
    assert describe_exit(3) == "exited with code 3 (BAD_TARGET)"
    assert describe_exit(77) == "exited with code 77"


def test_exit_codes_are_distinct_and_each_has_a_meaning() -> None:
    """One IntEnum holds every exit code, each documented in MEANING."""
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert set(MEANING) == set(ExitCode)
    assert (ExitCode.OK, ExitCode.USAGE) == (0, 2)


def test_docs_cover_every_flag_variable_and_exit_code() -> None:
    """docs/cli.md names every worker flag, every QFLOW_* variable and every exit code with its value."""
    text = DOCS.read_text()
    for code in ExitCode:
        assert re.search(rf"\|\s*{int(code)}\s*\|\s*`{code.name}`", text), code
    for var, _, _ in [*WORKER_ENV.values(), *COMMON_ENV.values()]:
        assert f"`{var}`" in text, var
    for flag in ("--processes", "--workers", "--concurrency", "--queue", "--burst", "--drain-timeout"):
        assert f"`{flag}" in text or f"{flag}`" in text, flag
    for flag in ("--max-jobs-per-child", "--max-memory-per-child", "--hang-timeout", "--in-process"):
        assert flag in text, flag
    for sig in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGTTIN", "SIGTTOU"):
        assert sig in text, sig


@pytest.mark.parametrize("target", ["app", "mod:", ":app", "mod:app:x", "mod:1app", "a b:app", "mod..x:app"])
def test_malformed_targets_are_rejected_before_any_import(target: str) -> None:
    """A target that is not ``module:attribute`` is a BadTarget saying which form is expected."""
    with pytest.raises(BadTarget):
        split_target(target)


def test_load_app_explains_each_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Missing module, missing attribute, wrong type and an import that raises each get a precise message."""
    (tmp_path / "good_mod.py").write_text(
        "import qflow\napp = qflow.App('redis://127.0.0.1:1/0')\nother = 3\n"
    )
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_app("good_mod:app").prefix == "qflow"
    with pytest.raises(BadTarget, match="no module named 'missing_mod_xyz'"):
        load_app("missing_mod_xyz:app")
    with pytest.raises(BadTarget, match="'good_mod' has no attribute 'nope'"):
        load_app("good_mod:nope")
    with pytest.raises(BadTarget, match=r"it is a builtins\.int, not a qflow\.App"):
        load_app("good_mod:other")
    with pytest.raises(BadTarget, match="raised RuntimeError: boom at import") as raised:
        load_app("broken_mod:app")
    assert "Traceback" in raised.value.details
    with pytest.raises(BadTarget, match="importing 'needs_dep' failed: ModuleNotFoundError"):
        load_app("needs_dep:app")


@pytest.mark.parametrize(
    ("target", "suggestion"),
    [
        ("examples/quickstart:app", "examples.quickstart:app"),
        ("./examples/quickstart.py:app", "examples.quickstart:app"),
        ("src\\shop\\tasks.py:app", "src.shop.tasks:app"),
    ],
)
def test_a_file_path_target_names_the_module_to_use(target: str, suggestion: str) -> None:
    """``qflow worker examples/quickstart.py:app`` is refused with the dotted module name to use instead."""
    hint = f"a module name, not a file path; did you mean '{suggestion}'?"
    with pytest.raises(BadTarget, match=re.escape(hint)):
        split_target(target)


def test_load_app_suggests_the_name_meant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attribute typo gets "did you mean 'app'?" (a qflow.App first), and ``mod.py:app`` a hint to drop
    the ``.py``; with no close name, the module's qflow.App objects are named."""
    (tmp_path / "typo_mod.py").write_text(
        "import qflow\napp = qflow.App('redis://127.0.0.1:1/0')\napq = 3\nhelper = 4\n"
    )
    (tmp_path / "other_name_mod.py").write_text(
        "import qflow\nmy_queues = qflow.App('redis://127.0.0.1:1/0')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadTarget, match=r"'typo_mod' has no attribute 'ap'; did you mean 'app'\?$"):
        load_app("typo_mod:ap")
    with pytest.raises(BadTarget, match=r"has no attribute 'helpr'; did you mean 'helper'\?$"):
        load_app("typo_mod:helpr")
    with pytest.raises(BadTarget, match=r"has no attribute 'app' \(its qflow\.App: 'my_queues'\)$"):
        load_app("other_name_mod:app")
    with pytest.raises(BadTarget, match=r"drop the '\.py': did you mean 'typo_mod:app'\?$"):
        load_app("typo_mod.py:app")


def test_child_config_travels_as_json() -> None:
    """The supervisor passes a child its config as JSON (no pickle), and it round-trips."""
    cfg = ChildConfig(target="m:app", name="worker-3", queues=["a"], concurrency=4, max_memory_mb=256.0)
    assert msgspec.json.decode(msgspec.json.encode(cfg), type=ChildConfig) == cfg


def test_backoff_grows_then_caps() -> None:
    """Replacing children that die young waits 0, 0, 0.5, 1, 2 ... seconds, capped at 10."""
    assert [supervisor._backoff(n) for n in range(1, 9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert supervisor._backoff(0) == 0.0


def test_rss_is_measured() -> None:
    """The memory guard reads this process's resident memory (more than a megabyte, less than a terabyte)."""
    assert 2**20 < rss_bytes() < 2**40


def test_log_lines_carry_the_process_name_and_pid(capsys: pytest.CaptureFixture[str]) -> None:
    """``configure_logging`` writes one format: time, level, ``name[pid]``, logger, message."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("INFO", "worker-7")
        logging.getLogger("qflow.test").info("hello %s", "there")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO    worker-7\[\d+\] qflow\.test: hello there", line
    ), line


def test_loop_flag_and_variable_take_asyncio_or_uvloop_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--loop`` / ``QFLOW_LOOP``: asyncio (default) or uvloop; anything else is a usage error."""
    assert parse_args(["worker", "m:app"]).loop == "asyncio"
    assert parse_args(["worker", "m:app", "--loop", "uvloop"]).loop == "uvloop"
    monkeypatch.setenv("QFLOW_LOOP", "uvloop")
    assert parse_args(["worker", "m:app"]).loop == "uvloop"
    with pytest.raises(SystemExit) as exc:
        parse_args(["worker", "m:app", "--loop", "trio"])
    assert exc.value.code == 2


def test_uvloop_asked_for_but_missing_is_a_clear_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(ConfigurationError, match=r"uvloop is not installed \(pip install 'qflow\[fast\]'\)"):
        loop_runner("uvloop")
    assert loop_runner("asyncio") is asyncio.run
