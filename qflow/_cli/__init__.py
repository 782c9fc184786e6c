"""The ``qflow`` command and the process supervisor: everything that runs *around* the library.

Data flows one way: these modules import the library (``qflow._app``, ``qflow._worker``, ``qflow._fleet``,
``qflow._inspect``, ...), and no library module imports them. The package's modules, by role:

- ``main``: ``main()``, the entry point (``qflow = "qflow._cli:main"``, ``python -m qflow``), and
  ``qflow worker``
- ``parser``, ``logs``, ``exitcodes``: the command line with its ``QFLOW_*`` variables, the one log format,
  the exit codes
- ``commands`` (status, info, jobs), ``scale``, ``server``, ``output``: the one-shot operator commands and
  how they print
- ``supervisor``, ``children``, ``control``: the parent of ``qflow worker -p N``, its worker processes as it
  sees them, and the control socket ``qflow scale`` talks to
- ``child``, ``guards``, ``importer``: one worker process (``python -m qflow._cli.child``), its memory
  guard and event-loop watchdog, and the ``module:app`` loader
"""

from __future__ import annotations

from .main import main as main

__all__ = ("main",)
