"""Field-level problems in the user's terms, shared by every HTTP route that validates records.

A batch endpoint (``POST /events``, ``POST /feedback``) validates each record on its own and
reports the bad ones by position; the wording is made here once so both endpoints say the same.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def field_path(loc: tuple[Any, ...]) -> str:
    """``("body", "k")`` -> ``"body.k"``."""
    return ".".join(str(p) for p in loc)


def record_problems(pos: int, error: ValidationError, what: str = "event") -> str:
    """One line naming the record's position and every bad field: ``event 3: field 'timestamp': ...``."""
    parts = [f"field '{field_path(err['loc']) or f'({what})'}': {err['msg']}" for err in error.errors()]
    return f"{what} {pos}: " + "; ".join(parts)
