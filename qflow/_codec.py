"""msgspec encoding of job envelopes, payloads, results and errors. Encoders and decoders are built once.

A job is stored as an ``Envelope`` (msgpack, array-like): the processor name, the payload as raw msgpack
bytes, and the job's option overrides (``JobOptions``, stored flat). The payload stays raw inside the
envelope so the worker can decode it with the processor's own typed decoder, and so a broken payload fails
that job only.
"""

from __future__ import annotations

import re
import traceback as tb
from typing import Any, Final

import msgspec

from ._options import NO_OPTIONS, JobOptions
from ._state import Backoff
from .exceptions import PayloadError, PayloadTooLarge

__all__ = ("DECODE_ERRORS", "Envelope", "ErrorInfo", "decode_envelope", "encode_envelope")

# msgspec raises more than DecodeError on hostile bytes: invalid UTF-8 in a str, nesting past the recursion
# limit, and ValidationError when the data does not fit the type (issue #2).
DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    UnicodeDecodeError,
    RecursionError,
    ValueError,
    TypeError,
)


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """What ``add`` stores: name, raw payload bytes, the job's ``JobOptions`` overrides (None = inherit).

    The options are stored flat, as the last three items of the array, so envelopes written before
    ``JobOptions`` existed read the same (the stored format is unchanged); ``options`` gathers them.
    """

    name: str
    payload: msgspec.Raw
    attempts: int | None = None
    timeout: float | None = None
    backoff: Backoff | None = None

    @classmethod
    def of(cls, name: str, payload: bytes, options: JobOptions) -> Envelope:
        """The envelope of a job called ``name`` with encoded ``payload`` and per-job ``options``."""
        return cls(name, msgspec.Raw(payload), options.attempts, options.timeout, options.backoff)

    @property
    def options(self) -> JobOptions:
        """The job's overrides of its processor's options (``NO_OPTIONS`` when it sets none)."""
        if self.attempts is None and self.timeout is None and self.backoff is None:
            return NO_OPTIONS
        return JobOptions(attempts=self.attempts, timeout=self.timeout, backoff=self.backoff)


class ErrorInfo(msgspec.Struct, frozen=True):
    """Why an attempt or a job failed: exception type, message, formatted traceback, and a short kind.

    ``kind`` is one of ``error`` (the handler raised), ``timeout``, ``stalled``, ``payload`` (could not
    decode), ``unknown_name`` (no processor registered), ``result`` (return value not encodable), ``corrupt``
    (its stored counters were not numbers; the scripts fail such a job alone, type ``CorruptJob``).
    """

    type: str
    message: str
    traceback: str = ""
    kind: str = "error"

    @classmethod
    def from_exception(cls, exc: BaseException, kind: str = "error") -> ErrorInfo:
        """Describe ``exc`` (with its traceback) for storage."""
        return cls(
            type=type(exc).__qualname__,
            message=str(exc),
            traceback="".join(tb.format_exception(exc)),
            kind=kind,
        )


_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)
_error_decoder: Final = msgspec.msgpack.Decoder(ErrorInfo)
_any_decoder: Final = msgspec.msgpack.Decoder()


def encode(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack with the shared encoder."""
    return _encoder.encode(obj)


def decode_any(data: bytes) -> Any:
    """Decode msgpack into plain Python data."""
    return _any_decoder.decode(data)


def encode_payload(payload: Any, *, limit: int, what: str) -> bytes:
    """Encode a payload, refusing what msgspec cannot encode and what is over ``limit`` bytes."""
    try:
        data = _encoder.encode(payload)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise PayloadError(
            f"{what}: payload cannot be encoded with msgspec: {type(exc).__name__}: {exc}"
        ) from exc
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{what}: encoded payload is {len(data):,} bytes, over max_payload_bytes={limit:,}; "
            "store large data elsewhere and enqueue a reference to it"
        )
    return data


def encode_envelope(env: Envelope) -> bytes:
    """Encode an envelope for the ``jobs`` hash."""
    return _encoder.encode(env)


def decode_envelope(data: bytes) -> Envelope:
    """Decode an envelope; raises ``PayloadError`` on any malformed input."""
    try:
        env = _envelope_decoder.decode(data)
        if env.attempts is not None or env.timeout is not None or env.backoff is not None:
            # Range-checked here (a ConfigurationError is a ValueError), so a bad stored option fails its
            # job like a bad payload does, before any worker runs it.
            JobOptions(attempts=env.attempts, timeout=env.timeout, backoff=env.backoff)
    except DECODE_ERRORS as exc:
        cause = f"{type(exc).__name__}: {exc}{_field(exc)}"
        raise PayloadError(f"job envelope cannot be decoded: {cause}") from exc
    return env


def _field(exc: Exception) -> str:
    """`` (field: attempts)`` for msgspec's "at `$[2]`": an envelope is an array, so name the position."""
    found = re.search(r"at `\$\[(\d+)\]", str(exc)) if isinstance(exc, msgspec.ValidationError) else None
    if found is None or int(found[1]) >= len(Envelope.__struct_fields__):
        return ""
    return f" (field: {Envelope.__struct_fields__[int(found[1])]})"


def encode_error(info: ErrorInfo) -> bytes:
    """Encode an ``ErrorInfo`` for the ``errors`` hash."""
    return _encoder.encode(info)


def decode_error(data: bytes) -> ErrorInfo:
    """Decode an ``ErrorInfo``; tolerate garbage by describing it."""
    try:
        return _error_decoder.decode(data)
    except DECODE_ERRORS:
        return ErrorInfo(type="UndecodableError", message=repr(data[:200]), kind="error")
