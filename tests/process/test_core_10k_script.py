"""Smoke test of the acceptance script ``benchmarks/core_10k.py`` (at a smaller size)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "core_10k.py"


@pytest.mark.timeout(90)
def test_core_10k_script_runs_every_job_exactly_once(redis_url: str, prefix: str) -> None:
    """The script adds 500 jobs, drains them with one in-process worker, and reports none lost or doubled."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", "500", "--url", redis_url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, output
    assert "lost 0" in proc.stdout
    assert "duplicates 0" in proc.stdout
    assert "completed-once 500" in proc.stdout
