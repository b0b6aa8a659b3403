"""What every HTTP model of Towerline accepts as text, time and money, and logging that cannot fail on it.

One definition, used by every request model (serving's ``RecommendRequest`` and ``ReloadRequest``,
``features.contracts.Event``, marketing's ``Feedback`` and ``AudienceRequest``), because each field
that slipped past one model turned into a 500 deeper down:

- ``Text``: a JSON string may hold a lone surrogate (``"\\ud800"``), which Python's ``json`` decodes
  into a ``str`` that no UTF-8 encoder, SQLite, Redis, FAISS vocabulary or log file accepts; a NUL
  (``"\\u0000"``) truncates C strings and paths. Both are rejected here, with the field named.
- ``Timestamp``: epoch seconds from an integer or an ISO-8601 string, always within
  1970-01-01..2100-01-01, so SQLite's and Redis's 64-bit integers and pandas' nanosecond
  timestamps hold every value that passes (2^63 used to overflow SQLite and roll a batch back).
- ``Money``: a finite float >= 0 (JSON's ``Infinity``/``NaN``, which Python's parser accepts, are not).
- ``strict`` everywhere: ``"5"``, ``true`` and ``5.0`` are not the integer 5.

``safe_text`` and ``SafeRecords`` make user strings safe for logs and response bodies: a record
holding an unencodable string once poisoned Ray Serve's buffered request log for the replica.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

MIN_EPOCH = 0  # 1970-01-01T00:00:00Z
MAX_EPOCH = 4_102_444_800  # 2100-01-01T00:00:00Z: far enough for any real event, far below int64
MAX_MONEY = 1e12  # a purchase value above a trillion is a bug in the client, not a sale


def check_text(v: str) -> str:
    """``v`` unchanged, or ``ValueError`` for a NUL or a lone surrogate (text no store can encode)."""
    if "\x00" in v:
        raise ValueError("must not contain NUL (\\u0000) characters")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds a lone surrogate such as \\ud800)") from None
    return v


Text = Annotated[str, Field(strict=True), AfterValidator(check_text)]
"""A string every store, log and encoder accepts; add ``Field(max_length=...)`` at the use site."""


def to_epoch(v: Any) -> Any:
    """Epoch seconds from an int or an ISO-8601 string/datetime; booleans and floats are refused.

    A date-time without an offset is read as UTC (the server's zone would make the stored value
    depend on where the replica runs). Anything else is passed on for the int validator to reject.
    """
    if isinstance(v, bool):
        raise ValueError("must be epoch seconds (an integer) or an ISO-8601 date-time, not a boolean")
    if isinstance(v, float):
        raise ValueError("must be whole epoch seconds (an integer such as 1700000000), not a float")
    if isinstance(v, str):
        if not v or v.strip().lstrip("+-").isdigit():
            raise ValueError("must be epoch seconds as a JSON integer or an ISO-8601 date-time string")
        try:
            v = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError("is neither epoch seconds nor an ISO-8601 date-time (e.g. 2024-05-01T12:00:00Z)") from None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        try:
            return math.floor(v.timestamp())
        except (OverflowError, ValueError, OSError):
            raise ValueError("is outside 1970-01-01..2100-01-01") from None
    return v


def check_epoch(v: int) -> int:
    if not MIN_EPOCH <= v <= MAX_EPOCH:
        raise ValueError(f"must be between 1970-01-01 and 2100-01-01 (epoch seconds {MIN_EPOCH}..{MAX_EPOCH})")
    return v


Timestamp = Annotated[
    int,
    BeforeValidator(to_epoch),
    AfterValidator(check_epoch),
    WithJsonSchema({
        "anyOf": [
            {"type": "integer", "minimum": MIN_EPOCH, "maximum": MAX_EPOCH},
            {"type": "string", "format": "date-time"},
        ],
        "description": "epoch seconds or ISO-8601, within 1970-01-01..2100-01-01 (no offset = UTC)",
    }),
]
"""Epoch seconds (int) in 1970..2100, from an int or an ISO-8601 date-time."""

Money = Annotated[float, Field(strict=True, ge=0, le=MAX_MONEY, allow_inf_nan=False)]
"""A finite amount >= 0 (an int is accepted as a float; a string or a boolean is not)."""


# ----------------------------------------------------------------------------- safe output


def safe_text(v: Any, limit: int = 200) -> str:
    """``v`` as text fit for a log line or a response body: escaped when it holds anything that is not
    printable UTF-8 (surrogates, NUL, newlines that would forge a log line), cut to ``limit``."""
    s = v if isinstance(v, str) else str(v)
    if not s.isprintable() or not _encodable(s):
        s = ascii(s)[1:-1]
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _encodable(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_json(value: Any, limit: int = 2000) -> Any:
    """A JSON-ready value whose every string (keys too) encodes as UTF-8: unencodable ones escaped."""
    if isinstance(value, str):
        return value if _encodable(value) and "\x00" not in value else safe_text(value, limit)
    if isinstance(value, dict):
        return {safe_json(k, limit) if isinstance(k, str) else k: safe_json(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [safe_json(v, limit) for v in value]
    return value


class SafeRecords(logging.Filter):
    """Rewrites a record whose message or traceback would not encode as UTF-8 into an escaped one.

    Formatting happens here, once, only for records that are emitted, so a handler writing to a file,
    a pipe or Ray Serve's buffered log never meets a string it cannot encode. Always returns True:
    it repairs records, it never drops them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken %-format: keep the raw parts, escaped
            message = f"{record.msg!a} % {record.args!a}"
            record.msg, record.args = message, None
        if not _encodable(message) or "\x00" in message:
            record.msg, record.args = ascii(message)[1:-1], None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if not _encodable(text) or "\x00" in text:
                record.exc_text = ascii(text)[1:-1].replace("\\n", "\n")
        return True


_SAFE = SafeRecords()


def install_safe_logging() -> None:
    """Make every record this process creates safe (``SafeRecords``), whichever handler emits it.

    A filter on a logger misses records of its children, and Ray Serve adds its own handlers in the
    replica, so the filter runs from the record factory, which every logger in the process uses.
    Idempotent.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_towerline_safe", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _SAFE.filter(record)
        return record

    factory._towerline_safe = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
