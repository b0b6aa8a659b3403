"""Field-level problems in the user's terms, and the problem+json shape of every HTTP error.

A batch endpoint (``POST /events``, ``POST /feedback``) validates each record on its own and
reports the bad ones by position; the wording is made here once so both endpoints say the same.
A rejected batch is summarised (``Rejections``): counts by reason and the first few examples, so a
client that sends 10,000 broken rows gets a short answer, not every rejection spelled out.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel, Field, ValidationError

from towerline.text import safe_json, safe_text

if TYPE_CHECKING:
    from starlette.responses import JSONResponse

MAX_EXAMPLES = 20  # rejected records spelled out in a batch answer; the rest are counted by reason
MAX_REASONS = 50  # distinct reasons counted; more (crafted field names) fold into "other"


def field_path(loc: tuple[Any, ...]) -> str:
    """``("body", "k")`` -> ``"body.k"``; parts that came from the request are escaped and cut short."""
    return ".".join(safe_text(p, 64) for p in loc)


def record_problems(pos: int, error: ValidationError, what: str = "event") -> str:
    """One line naming the record's position and every bad field: ``event 3: field 'timestamp': ...``."""
    parts = [f"field '{field_path(err['loc']) or f'({what})'}': {err['msg']}" for err in error.errors()[:10]]
    return f"{what} {pos}: " + "; ".join(parts)


def reasons_of(error: ValidationError) -> list[str]:
    """Short reason keys of a record's errors (``"timestamp: less_than_equal"``), for counting.

    Unknown fields count as one reason whatever their name: a client inventing names must not grow
    the summary.
    """
    keys = []
    for err in error.errors():
        name = "(unknown field)" if err["type"] == "extra_forbidden" else field_path(tuple(p for p in err["loc"] if isinstance(p, str)))
        keys.append(f"{name or '(record)'}: {err['type']}")
    return sorted(set(keys))


@dataclass
class Rejections:
    """The rejected records of one batch: a count, counts per reason, the first ``MAX_EXAMPLES`` lines."""

    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reasons: list[str], message: str) -> None:
        self.count += 1
        for r in reasons:
            self.by_reason[r if r in self.by_reason or len(self.by_reason) < MAX_REASONS else "other"] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(safe_text(message, 500))

    def add_invalid(self, pos: int, error: ValidationError, what: str = "event") -> None:
        self.add(reasons_of(error), record_problems(pos, error, what))

    def as_response(self) -> dict[str, Any]:
        """``rejected`` (the first examples), ``rejected_count`` and ``rejected_by_reason``."""
        return {"rejected": self.examples, "rejected_count": self.count,
                "rejected_by_reason": dict(self.by_reason.most_common())}


@dataclass
class StoredBatch:
    """What a batch endpoint did with its records: the valid ones, and the store's counts."""

    valid: list[Any]
    accepted: int
    duplicate: int
    rejections: Rejections

    def as_response(self) -> dict[str, Any]:
        """``accepted``, ``duplicate`` and the rejection summary: the body both batch endpoints answer."""
        return {"accepted": self.accepted, "duplicate": self.duplicate, **self.rejections.as_response()}


async def validate_and_store(
    body: list[Any], model: type[BaseModel], store: Callable[[list[Any]], Any], what: str = "event"
) -> StoredBatch:
    """Validate each record of ``body`` as ``model`` on its own, hand the valid ones to ``store``
    (run in a thread: SQLite and Redis block), and summarise both kinds of rejection.

    The one loop of ``POST /events`` and ``POST /feedback``: a bad record rejects itself only, by
    position and reason. ``store(valid)`` returns counts ``accepted``, ``duplicate`` and the
    ``rejected`` messages (``serving.history.AppendResult``, ``marketing.feedback.FeedbackResult``).
    """
    valid: list[Any] = []
    rejections = Rejections()
    for pos, raw in enumerate(body):
        try:
            valid.append(model.model_validate(raw))
        except ValidationError as e:
            rejections.add_invalid(pos, e, what)
    result = await asyncio.to_thread(store, valid) if valid else None
    for message in result.rejected if result else ():
        rejections.add([store_reason(message)], message)
    return StoredBatch(valid, result.accepted if result else 0, result.duplicate if result else 0, rejections)


def store_reason(message: str) -> str:
    """The reason key of a store's rejection message (``serving.history``'s and ``marketing.feedback``'s wording)."""
    for needle, reason in (("already used", "event_id: already used for a different event"),
                           ("unknown experiment", "experiment: unknown"), ("has no arm", "arm: unknown"),
                           ("no arm", "arm: missing")):
        if needle in message:
            return reason
    return "store: could not be stored"


# ----------------------------------------------------------------------------- problem+json responses

PROBLEM = "application/problem+json"


class Problem(BaseModel):
    """An RFC 9457 problem details body, as every 4xx/5xx of the service returns it."""

    type: str = Field("about:blank", description="always about:blank: the status says what kind of problem")
    title: str = Field(description="the status in words, e.g. Unprocessable Content")
    status: int = Field(description="the HTTP status code, repeated")
    detail: str = Field(description="what went wrong and how to fix it")
    instance: Optional[str] = Field(None, description="the request path")
    errors: Optional[list[dict[str, Any]]] = Field(None, description="422: one entry per bad field (field, location, message)")
    error_id: Optional[str] = Field(None, description="500: quote it to the operator; the server log carries the cause")
    limit: Optional[int] = Field(None, description="413: the limit the request exceeded")


def problem(status: int, title: str, detail: str, *, headers: Optional[dict[str, str]] = None, **extra: Any) -> "JSONResponse":
    """An RFC 9457 ``application/problem+json`` response; every string in it made encodable first.

    Shared by the serving ingress (4xx, the opaque 500) and anything that answers 503/504, so every
    error of the service has one shape. Strings that came from the request (an unknown field's name,
    an id) are escaped when they would not encode as UTF-8 (``towerline.text.safe_json``): a body
    that cannot be encoded was itself a 500.
    """
    from starlette.responses import JSONResponse

    body = safe_json({"type": "about:blank", "title": title, "status": status, "detail": detail, **extra})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)
