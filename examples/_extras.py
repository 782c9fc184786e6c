"""Tell a reader which extra an example needs, instead of a bare ``ModuleNotFoundError``."""

from __future__ import annotations

import importlib.util

EXAMPLES_EXTRA = "pip install -e '.[examples]'"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: blocked by a None entry in sys.modules
        return False


def missing_extra(example: str, *modules: str) -> str | None:
    """The message for ``example`` when one of ``modules`` cannot be imported, else None."""
    missing = [name for name in modules if not _importable(name)]
    if not missing:
        return None
    return (
        f"{example} needs {', '.join(missing)}, from qflow's 'examples' extra; install it with: "
        f"{EXAMPLES_EXTRA}"
    )


def require(example: str, *modules: str) -> None:
    """Exit with ``missing_extra``'s message (on stderr, exit code 1) when ``example`` cannot run here."""
    message = missing_extra(example, *modules)
    if message is not None:
        raise SystemExit(message)
