"""Draw the job lifecycle on the Concepts page from ``qflow._state.TRANSITIONS``, the code's own table.

The drawing (a mermaid state diagram and a table) lives in ``docs/concepts.md`` between two markers, so it
reads well on GitHub too. This module renders it from the code and keeps the page honest:

- as an mkdocs hook, it warns when the page's copy differs from the code (``mkdocs build --strict`` fails);
- run as a script (``python docs/hooks/lifecycle.py``), it rewrites the page's copy from the code.

``tests/docs/test_lifecycle.py`` checks the same thing without building the site.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

BEGIN = "<!-- lifecycle:begin (generated from qflow/_state.py by docs/hooks/lifecycle.py: do not edit) -->"
END = "<!-- lifecycle:end -->"
PAGE = "concepts.md"
PAGE_PATH = Path(__file__).resolve().parents[1] / PAGE

log = logging.getLogger("mkdocs.hooks.lifecycle")


def render() -> str:
    """The diagram and the table, from ``TRANSITIONS`` (markers excluded)."""
    from qflow._state import TERMINAL, TRANSITIONS, State

    def node(state: State | None) -> str:
        return "[*]" if state is None else state.value

    # One arrow per (from, to) pair, labelled with every script that makes that move, in table order.
    arrows: dict[tuple[str, str], list[str]] = {}
    for src, dst, script, _why in TRANSITIONS:
        scripts = arrows.setdefault((node(src), node(dst)), [])
        if script not in scripts:
            scripts.append(script)
    lines = ["```mermaid", "stateDiagram-v2"]
    lines += [f"    {src} --> {dst}: {' / '.join(scripts)}" for (src, dst), scripts in arrows.items()]
    lines += [f"    {state.value} --> [*]" for state in State if state in TERMINAL]
    lines += ["```", "", "| from | to | Lua script | when |", "| --- | --- | --- | --- |"]
    for src, dst, script, why in TRANSITIONS:
        before = "*(new job)*" if src is None else f"`{src.value}`"
        lines.append(f"| {before} | `{dst.value}` | `{script}.lua` | {why} |")
    return "\n".join(lines)


def split(markdown: str) -> tuple[str, str, str] | None:
    """``(before, generated, after)`` around the markers, or None when they are missing."""
    start = markdown.find(BEGIN)
    end = markdown.find(END)
    if start < 0 or end < start:
        return None
    body_start = start + len(BEGIN)
    return markdown[:body_start], markdown[body_start:end].strip("\n"), markdown[end:]


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """mkdocs hook: warn (an error under ``--strict``) when the page's lifecycle is not the code's."""
    if page.file.src_uri != PAGE:
        return markdown
    parts = split(markdown)
    if parts is None:
        log.warning("%s: lifecycle markers not found; add them and run python docs/hooks/lifecycle.py", PAGE)
        return markdown
    if parts[1] != render():
        log.warning(
            "%s: the job lifecycle differs from qflow/_state.py TRANSITIONS; "
            "run `python docs/hooks/lifecycle.py` to redraw it",
            PAGE,
        )
    return markdown


def main() -> int:
    """Rewrite the page's lifecycle from the code; print whether it changed."""
    text = PAGE_PATH.read_text(encoding="utf-8")
    parts = split(text)
    if parts is None:
        sys.stderr.write(f"{PAGE_PATH}: add the two markers first:\n{BEGIN}\n{END}\n")
        return 1
    before, current, after = parts
    fresh = render()
    if current == fresh:
        sys.stdout.write(f"{PAGE_PATH}: up to date\n")
        return 0
    PAGE_PATH.write_text(f"{before}\n{fresh}\n{after}", encoding="utf-8")
    sys.stdout.write(f"{PAGE_PATH}: redrawn from qflow/_state.py\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
