"""``qflow worker tests.faults.fault_app:app``: ``ledger_app``'s processors and ledger, for supervised
workers, and the soak's other kinds of job (``soak_app``) on the same queue.

Each worker process imports this module itself (the supervisor never does) and gets the App configured by
``ledger_app``'s environment variables, its own ledger file and, if asked, a crash point. The test process
never imports it: producers use ``ledger_app.build_app`` (and ``soak_app.declare``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.faults import soak_app
from tests.process import ledger_app

_dir = os.environ.get(ledger_app.ENV_DIR)
_ledger = ledger_app.LedgerWriter(Path(_dir)) if _dir else None
app = ledger_app.app_from_env(_ledger)
soak_app.declare(app.queue(ledger_app.QUEUE), _ledger)
