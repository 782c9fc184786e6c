"""The example project on docs/testing.md passes its own tests: its files are written out, pytest is run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.docs.markdown_blocks import blocks

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing.md"


def test_testing_page_example_project_passes_its_tests(tmp_path: Path) -> None:
    """Write every titled block of the page to its file, run pytest there: all the page's tests pass."""
    files = [b for b in blocks(PAGE) if b.title]
    assert {b.title for b in files} >= {"tasks.py", "conftest.py", "test_tasks.py", "pyproject.toml"}
    for b in files:
        assert b.title is not None
        (tmp_path / b.title).write_text(b.code, encoding="utf-8")
    expected = len(re.findall(r"^async def test_", (tmp_path / "test_tasks.py").read_text(), flags=re.M))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QFLOW_", "REDIS_URL", "PYTEST_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{expected} passed" in done.stdout, done.stdout
