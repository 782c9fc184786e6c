"""Load the ``module:attribute`` target the CLI is given, with one precise error per way it can go wrong.

Modelled on uvicorn's importer: a missing module, a missing attribute and an object of the wrong type each
get their own one-line message; an exception raised *inside* the imported module is a bug in that module,
reported with its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import traceback
from typing import TYPE_CHECKING

from ..exceptions import QflowError

if TYPE_CHECKING:
    from .._app import App

__all__ = ("BadTarget", "load_app", "split_target")


class BadTarget(QflowError):
    """``module:app`` cannot be loaded; ``str()`` is the one-line reason, ``details`` a traceback or ''."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def split_target(target: str) -> tuple[str, str]:
    """Split ``"pkg.module:attr.path"`` in two, or raise ``BadTarget`` saying what form is expected.

    A file path (``examples/quickstart.py:app``) is refused with the dotted module name to use instead.
    """
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr or any(not part.isidentifier() for part in attr.split(".")):
        raise BadTarget(f"invalid target {target!r}: expected 'module:attribute', e.g. 'myproject.tasks:app'")
    if any(not part.isidentifier() for part in module.split(".")):
        hint = ""
        dotted = _module_of_path(module)
        if dotted is not None:
            hint = f": a module name, not a file path; did you mean '{dotted}:{attr}'?"
        raise BadTarget(f"invalid module name {module!r} in target {target!r}{hint}")
    return module, attr


def _module_of_path(path: str) -> str | None:
    """``examples/quickstart.py`` -> ``examples.quickstart`` (None if that is no module name either)."""
    text = path.replace("\\", "/").removesuffix(".py")
    while text.startswith("./"):
        text = text[2:]
    dotted = text.strip("/").replace("/", ".")
    if dotted and dotted != path and all(part.isidentifier() for part in dotted.split(".")):
        return dotted
    return None


def _suggest(obj: object, missing: str) -> str:
    """``; did you mean 'app'?`` for a mistyped attribute of ``obj`` (qflow.App objects first), or ''."""
    from .._app import App

    try:
        namespace = dict(vars(obj))
    except TypeError:
        return ""
    apps = sorted(name for name, value in namespace.items() if isinstance(value, App))
    names = sorted(name for name in namespace if not name.startswith("__"))
    close = difflib.get_close_matches(missing, apps, n=1) or difflib.get_close_matches(missing, names, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    if apps:
        return f" (its qflow.App: {', '.join(map(repr, apps))})"
    return ""


def load_app(target: str) -> App:
    """Import ``module`` and return its ``attribute`` (a dotted path), which must be a ``qflow.App``.

    The current directory is put on ``sys.path`` first, as ``python -m`` would, so ``qflow worker
    myproject.tasks:app`` works from the project's root.
    """
    from .._app import App

    module_name, attr_path = split_target(target)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            if module_name.endswith(".py"):
                # `qflow worker tasks.py:app` imports the module `py` of a package `tasks`: almost always a
                # file name given where a module name belongs.
                raise BadTarget(
                    f"cannot load {target!r}: no module named {module_name!r}; drop the '.py': "
                    f"did you mean '{module_name.removesuffix('.py')}:{attr_path}'?"
                ) from None
            raise BadTarget(
                f"cannot load {target!r}: no module named {exc.name!r} "
                f"(is the project's directory the current one, or on PYTHONPATH?)"
            ) from None
        raise BadTarget(
            f"cannot load {target!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
            traceback.format_exc(),
        ) from None
    except Exception as exc:
        raise BadTarget(
            f"cannot load {target!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}",
            traceback.format_exc(),
        ) from None
    obj: object = module
    walked = module_name
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadTarget(
                f"cannot load {target!r}: {walked!r} has no attribute {part!r}{_suggest(obj, part)}"
            ) from None
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    if not isinstance(obj, App):
        raise BadTarget(
            f"cannot load {target!r}: it is a {type(obj).__module__}.{type(obj).__qualname__}, "
            "not a qflow.App"
        )
    return obj
