"""Skew this interpreter's wall clock by ``$QFLOW_FAULTS_SKEW`` seconds (fallback when libfaketime is absent).

Put this directory first on ``PYTHONPATH`` and Python imports it at start-up, before any qflow code: then
``time.time``, ``time.time_ns`` and ``datetime.now``/``utcnow``/``today`` all run ahead (or behind) by the
skew, as on a machine whose clock is wrong. The monotonic clock is left alone, as libfaketime is told to.
"""

from __future__ import annotations

import datetime as _dt
import os
import time as _time

_skew = float(os.environ.get("QFLOW_FAULTS_SKEW", "0") or 0)

if _skew:
    _real_time, _real_time_ns = _time.time, _time.time_ns

    def _time_skewed() -> float:
        return _real_time() + _skew

    def _time_ns_skewed() -> int:
        return _real_time_ns() + int(_skew * 1e9)

    _time.time = _time_skewed
    _time.time_ns = _time_ns_skewed

    class _SkewedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz: _dt.tzinfo | None = None) -> _SkewedDatetime:
            return cls.fromtimestamp(_time_skewed(), tz)

        @classmethod
        def utcnow(cls) -> _SkewedDatetime:
            return cls.fromtimestamp(_time_skewed(), _dt.UTC).replace(tzinfo=None)

        @classmethod
        def today(cls) -> _SkewedDatetime:
            return cls.fromtimestamp(_time_skewed())

    _dt.datetime = _SkewedDatetime  # type: ignore[misc]
