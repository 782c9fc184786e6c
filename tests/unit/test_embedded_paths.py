"""Which embedded server a process uses, and the line that says so: path rules only, no server started."""

from __future__ import annotations

from pathlib import Path

import pytest

from qflow import _embedded


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``outer`` (a git checkout) holding ``outer/app`` (a pyproject.toml) and plain subdirectories."""
    monkeypatch.delenv("QFLOW_HOME", raising=False)
    outer = tmp_path.resolve() / "outer"
    (outer / "app" / "pkg" / "deep").mkdir(parents=True)
    (outer / "docs").mkdir()
    (outer / ".git").mkdir()
    (outer / "app" / "pyproject.toml").write_text("[project]\nname = 'app'\n")
    return outer


def test_every_subdirectory_of_a_project_gets_the_server_of_its_root(tree: Path) -> None:
    """The root and each directory below it resolve to one ``<root>/.qflow``, naming the marker."""
    root = tree / "app"
    servers = {_embedded.server_for(cwd=d) for d in (root, root / "pkg", root / "pkg" / "deep")}
    assert servers == {_embedded.EmbeddedServer(root / ".qflow")}
    assert (
        _embedded.server_for(cwd=root / "pkg").reason == f"project root found at {root} by its pyproject.toml"
    )


def test_the_nearest_marker_wins_and_git_counts(tree: Path) -> None:
    """A nested project is its own root; outside it, the enclosing ``.git`` makes the root."""
    assert _embedded.find_project_root(tree / "app" / "pkg") == (tree / "app", "pyproject.toml")
    assert _embedded.find_project_root(tree / "docs") == (tree, ".git")
    assert _embedded.server_for(cwd=tree / "docs").home == tree / ".qflow"


def test_a_git_file_marks_a_root_too(tmp_path: Path) -> None:
    """A ``.git`` file (a worktree or a submodule) marks a project root like a ``.git`` directory."""
    (tmp_path / "wt" / "sub").mkdir(parents=True)
    (tmp_path / "wt" / ".git").write_text("gitdir: /elsewhere/.git/worktrees/wt\n")
    assert _embedded.find_project_root(tmp_path / "wt" / "sub") == ((tmp_path / "wt").resolve(), ".git")


def test_qflow_home_wins_over_the_project_and_an_explicit_home_over_both(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``QFLOW_HOME`` beats the project root; a ``home`` argument (``--home``) beats ``QFLOW_HOME``."""
    monkeypatch.setenv("QFLOW_HOME", str(tmp_path / "qh"))
    by_env = _embedded.server_for(cwd=tree / "app" / "pkg")
    assert (by_env.home, by_env.reason) == ((tmp_path / "qh").resolve(), "set by QFLOW_HOME")
    explicit = _embedded.server_for(tmp_path / "given", cwd=tree / "app")
    assert (explicit.home, explicit.reason) == ((tmp_path / "given").resolve(), "given explicitly")


def test_without_a_marker_the_current_directory_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no marker up to the filesystem root: ``<cwd>/.qflow``, the reason naming what was looked for."""
    monkeypatch.delenv("QFLOW_HOME", raising=False)
    loose = tmp_path.resolve()
    if _embedded.find_project_root(loose) is not None:
        pytest.skip(f"a project marker above the temp dir: {_embedded.find_project_root(loose)}")
    monkeypatch.chdir(loose)
    monkeypatch.setattr(_embedded, "_main_script", lambda: None)  # as with `python -c`
    server = _embedded.server_for()
    assert server.home == loose / ".qflow"
    assert (
        server.reason
        == f"no pyproject.toml, setup.py, setup.cfg or .git in {loose} or above: the current directory"
    )


def test_run_from_outside_any_project_a_script_finds_the_project_it_lives_in(
    tree: Path, tmp_path: Path
) -> None:
    """``python app/enqueue.py`` from the project's parent reaches the project's server, and says why."""
    parent = tmp_path / "elsewhere"
    parent.mkdir()
    if _embedded.find_project_root(parent) is not None:
        pytest.skip(f"a project marker above the temp dir: {_embedded.find_project_root(parent)}")
    script = tree / "app" / "pkg" / "enqueue.py"
    server = _embedded.server_for(cwd=parent, script=script)
    assert server.home == tree / "app" / ".qflow"
    assert server.reason == (
        f"project root found at {tree / 'app'} by its pyproject.toml, above the running program {script}"
    )
    # The directory one works in still comes first.
    assert _embedded.server_for(cwd=tree / "docs", script=script).home == tree / ".qflow"


def test_the_line_is_said_once_per_process_and_quiet_hides_only_attaching(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``announce`` prints once per server and process; ``quiet`` hides "using" but never "started"."""
    one = _embedded.EmbeddedServer(tmp_path / "one", reason="set by QFLOW_HOME")
    _embedded.announce(one, started=False)
    _embedded.announce(one, started=False)
    err = capsys.readouterr().err
    assert err == (
        f"qflow: using the embedded Valkey server in {tmp_path / 'one'} (set by QFLOW_HOME); "
        "for production set QFLOW_REDIS_URL\n"
    )
    _embedded.announce(_embedded.EmbeddedServer(tmp_path / "two"), started=False, quiet=True)
    _embedded.announce(_embedded.EmbeddedServer(tmp_path / "two"), started=False)  # already counted as said
    assert capsys.readouterr().err == ""
    _embedded.announce(_embedded.EmbeddedServer(tmp_path / "three"), started=True, quiet=True)
    assert "started the embedded Valkey server" in capsys.readouterr().err
