"""The job lifecycle drawn on docs/concepts.md is the code's own table, ``qflow._state.TRANSITIONS``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from qflow._state import TRANSITIONS, State

HOOK = Path(__file__).resolve().parents[2] / "docs" / "hooks" / "lifecycle.py"


def load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qflow_docs_lifecycle", HOOK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concepts_page_lifecycle_matches_transitions() -> None:
    """The page's diagram and table are exactly what the hook renders from TRANSITIONS (else: redraw)."""
    hook = load_hook()
    parts = hook.split(hook.PAGE_PATH.read_text(encoding="utf-8"))
    assert parts is not None, "lifecycle markers missing from docs/concepts.md"
    assert parts[1] == hook.render(), "docs/concepts.md is stale: run `python docs/hooks/lifecycle.py`"


def test_rendered_lifecycle_has_one_table_row_per_transition_and_every_state() -> None:
    """Each transition is a table row naming its script; every state appears in the diagram."""
    text = load_hook().render()
    rows = [line for line in text.splitlines() if line.startswith("| ") and ".lua`" in line]
    assert len(rows) == len(TRANSITIONS)
    for (_src, dst, script, why), row in zip(TRANSITIONS, rows, strict=True):
        assert f"`{dst.value}`" in row
        assert f"`{script}.lua`" in row
        assert why in row
    diagram = text.split("```")[1]
    for state in State:
        assert state.value in diagram
