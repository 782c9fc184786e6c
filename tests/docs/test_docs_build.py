"""The documentation site builds with ``mkdocs build --strict``: no warning, no broken link, no stale page."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[docs]'; the dev extra includes it)",
)


def test_docs_build_in_strict_mode_with_zero_warnings(tmp_path: Path) -> None:
    """Strict build into a temp dir: exit 0, no WARNING line; every page and the API reference exist."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            "mkdocs.yml",
            "--site-dir",
            str(site),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    for page in ("tutorial", "concepts", "guarantees", "deployment", "testing", "comparison", "cli"):
        assert (site / page / "index.html").is_file(), page
    reference = (site / "reference" / "qflow" / "index.html").read_text(encoding="utf-8")
    assert "run_worker" in reference  # mkdocstrings rendered the docstrings
    assert "recover.lua" in (site / "concepts" / "index.html").read_text(encoding="utf-8")
