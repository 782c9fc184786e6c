"""The tutorial's code works: each Python block of docs/tutorial.md runs, in page order, on the test server.

Each block is saved under its title (``tasks.py``, ``enqueue.py``...) in one temporary directory and run as
``python FILE`` from there, as the page tells readers to do. A ``text`` block titled ``output`` right after a
Python block must equal what that file printed on the terminal: stdout and stderr (log lines) in the order
they came. The only thing the harness changes is the key prefix (so the run cannot meet another test's keys);
the server comes from the ``redis_url`` fixture. The test server keeps no AOF, so the worker's warning about
that (which a reader on the embedded server, AOF on, never sees) is left out of the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.markdown_blocks import Block, blocks

REPO_ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = REPO_ROOT / "docs" / "tutorial.md"

# Runs one saved block as __main__ after pointing every qflow.App at the test's own key prefix.
RUNNER = """\
import functools, runpy, sys
import qflow
qflow.App.__init__ = functools.partialmethod(qflow.App.__init__, prefix=sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


SERVER_NOTE = "the Redis server has AOF off"  # qflow._broker.servercheck, about the test server's settings


def steps() -> list[tuple[Block, str | None]]:
    """Python blocks in page order, each with the output the page shows for it (or None)."""
    found = blocks(TUTORIAL)
    result: list[tuple[Block, str | None]] = []
    for i, block in enumerate(found):
        if block.lang != "python":
            continue
        after = found[i + 1] if i + 1 < len(found) else None
        expected = after.code if after and after.lang == "text" and after.title == "output" else None
        result.append((block, expected))
    return result


def test_tutorial_blocks_are_files_with_distinct_names() -> None:
    """Every Python block has a file-name title, each used once, and every output block follows one."""
    found = blocks(TUTORIAL)
    titles = [b.title for b in found if b.lang == "python"]
    assert len(titles) >= 5
    assert all(t and t.endswith(".py") for t in titles), titles
    assert len(set(titles)) == len(titles), titles
    for i, b in enumerate(found):
        if b.title == "output":
            assert i > 0
            assert found[i - 1].lang == "python", f"output block at line {b.line} follows no Python block"


def test_every_python_block_of_the_tutorial_runs_in_order(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Run the tutorial's files one after the other, as a reader would; each exits 0 and prints its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QFLOW_HOME")}
    env.update(
        {
            "QFLOW_REDIS_URL": redis_url,
            "QFLOW_EMBEDDED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave as on a terminal
        }
    )
    for block, expected in steps():
        assert block.title is not None
        (tmp_path / block.title).write_text(block.code, encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, prefix, block.title],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        where = f"docs/tutorial.md line {block.line} ({block.title})"
        if done.returncode != 0:
            pytest.fail(f"{where} exited {done.returncode}\n--- output\n{done.stdout}")
        if expected is not None:
            printed = "\n".join(line for line in done.stdout.splitlines() if not line.startswith(SERVER_NOTE))
            assert printed.strip() == expected.strip(), f"{where} printed other than the page says"
