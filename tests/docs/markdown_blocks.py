"""Fenced code blocks of a Markdown page, with their language, title and line number."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)(?P<attrs>.*)$")
_TITLE = re.compile(r"""title=(?P<q>["'])(?P<title>.*?)(?P=q)""")


@dataclass(frozen=True)
class Block:
    """One fenced block: ``lang`` (``python``, ``text``...), optional ``title``, body, 1-based line."""

    lang: str
    title: str | None
    code: str
    line: int


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in page order (nested fences are not supported)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        closing = re.compile(rf"^{re.escape(m['indent'])}{m['fence']}\s*$")
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: fence never closed")
        title = _TITLE.search(m["attrs"])
        found.append(
            Block(
                lang=m["lang"],
                title=title["title"] if title else None,
                code=textwrap.dedent("\n".join(body)) + "\n",
                line=start + 1,
            )
        )
        i += 1
    return found
