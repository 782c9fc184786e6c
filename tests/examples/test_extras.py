"""An example whose extra is not installed says which extra to install, instead of a bare traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.examples.conftest import REPO_ROOT, clean_env

# Runs a module as __main__ with some packages made unimportable (a None entry in sys.modules), as if the
# 'examples' extra had not been installed.
WITHOUT = """\
import runpy, sys
for name in sys.argv[2:]:
    sys.modules[name] = None
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("module", "hidden", "example"),
    [
        ("examples.webapp.measure", ["starlette"], "examples.webapp"),
        ("examples.webapp.measure", ["uvicorn"], "examples.webapp"),
        ("examples.patterns.lifespan", ["httpx"], "examples.patterns.lifespan"),
        ("examples.patterns.lifespan", ["starlette", "uvicorn"], "examples.patterns.lifespan"),
    ],
)
def test_example_without_its_extra_names_the_extra_to_install(
    module: str, hidden: list[str], example: str
) -> None:
    """No ModuleNotFoundError traceback: one line naming the missing packages and the pip command."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT, module, *hidden],
        cwd=REPO_ROOT,
        env=clean_env(QFLOW_EMBEDDED="0"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{example} needs {', '.join(hidden)}, from qflow's 'examples' extra" in done.stderr
    assert "pip install -e '.[examples]'" in done.stderr
