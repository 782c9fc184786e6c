"""Logging setup for the ``qflow`` command and its worker processes: one format, tagged ``name[pid]``.

Library modules only call ``logging.getLogger(__name__)``; configuring logging is the CLI's job, done here
for the supervisor, each worker process and the one-shot commands (``--no-log-config`` skips it).
"""

from __future__ import annotations

import logging
import sys

__all__ = ("LOG_FORMAT", "LOG_LEVELS", "configure_logging")

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(qflow_process)s[%(process)d] %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _ProcessTag(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.tag = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.qflow_process = self.tag
        return True


def configure_logging(level: str, process_name: str) -> None:
    """Send every log line to stderr in qflow's one format, tagged ``process_name[pid]`` (CLI use only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_ProcessTag(process_name))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
