"""Helpers for the example smoke tests: run an example as a subprocess from the repository root."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

needs_cli = pytest.mark.skipif(
    importlib.util.find_spec("qflow.__main__") is None,
    reason="`python -m qflow worker` does not exist yet (issue 3, the CLI, has not landed)",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any qflow/Redis setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QFLOW_", "PYTEST_")) and k not in ("REDIS_URL", "COVERAGE_PROCESS_START")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run(
    args: list[str], *, env: dict[str, str], cwd: Path = REPO_ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS``; fail the test with both streams if it does not exit 0."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        streams = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        pytest.fail(f"python {' '.join(args)} exited {done.returncode}\n{streams}")
    return done
