"""An example whose extra is not installed says which extra to install, instead of a bare traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.examples.conftest import REPO_ROOT, clean_env

WEB = ["starlette", "uvicorn"]  # what each example needs, in the order its require() names them
LIFESPAN = ["httpx", *WEB]

# Runs a module as __main__ with some packages made unimportable (a None entry in sys.modules), as if the
# 'examples' extra had not been installed.
WITHOUT = """\
import runpy, sys
for name in sys.argv[2:]:
    sys.modules[name] = None
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    ("module", "hidden", "example", "needs"),
    [
        ("examples.webapp.measure", ["starlette"], "examples.webapp", WEB),
        ("examples.webapp.measure", ["uvicorn"], "examples.webapp", WEB),
        ("examples.patterns.lifespan", ["httpx"], "examples.patterns.lifespan", LIFESPAN),
        ("examples.patterns.lifespan", ["starlette", "uvicorn"], "examples.patterns.lifespan", LIFESPAN),
    ],
)
def test_example_without_its_extra_names_the_extra_to_install(
    module: str, hidden: list[str], example: str, needs: list[str]
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
    # The hidden ones, and any other the example needs that this environment lacks (the suite also runs
    # with the test extra alone, as the README's test command installs it).
    missing = [name for name in needs if name in hidden or importlib.util.find_spec(name) is None]
    assert f"{example} needs {', '.join(missing)}, from qflow's 'examples' extra" in done.stderr
    assert "pip install -e '.[examples]'" in done.stderr
