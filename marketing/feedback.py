"""The feedback store: impressions, clicks and purchases per experiment arm (SQLite), idempotent on ``event_id``."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from towerline.config import ExperimentConfig
from towerline.text import Money, Text, Timestamp
from towerline.sqlite import open_sqlite
from towerline.marketing.assignment import assign_arm

log = logging.getLogger(__name__)

FEEDBACK_KINDS = ("impression", "click", "purchase")


# feedback


class Feedback(BaseModel):
    """One impression, click or purchase, as ``POST /feedback`` receives it (typed by ``towerline.text``)."""

    model_config = ConfigDict(extra="forbid")

    experiment: Annotated[Text, Field(min_length=1, max_length=128)]
    arm: Optional[Annotated[Text, Field(min_length=1, max_length=128)]] = Field(
        default=None, description="the arm that served it; derived from the user when absent")
    user_id: Annotated[Text, Field(min_length=1, max_length=256)]
    item_id: Optional[Annotated[Text, Field(min_length=1, max_length=256)]] = None
    kind: Literal["impression", "click", "purchase"]
    value: Optional[Money] = Field(default=None, description="money, for purchases")
    timestamp: Optional[Timestamp] = Field(default=None, description="epoch seconds or ISO-8601 (1970..2100); the server's clock when absent")
    event_id: Optional[Annotated[Text, Field(min_length=1, max_length=256)]] = Field(default=None, description="deduplication key")


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int = 0
    duplicate: int = 0
    rejected: list[str] = field(default_factory=list)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    event_id   TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    arm        TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    item_id    TEXT,
    kind       TEXT NOT NULL CHECK (kind IN ('impression', 'click', 'purchase')),
    value      REAL,
    timestamp  INTEGER NOT NULL,
    received   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_experiment ON feedback(experiment, arm, user_id);
"""


class FeedbackStore:
    """Impressions, clicks and purchases per experiment arm in one SQLite file (WAL mode).

    Example::

        store = FeedbackStore("feedback.db")
        store.record([Feedback(experiment="home", arm="treatment", user_id="u1", kind="click")])
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._conn, self._lock = open_sqlite(self.path, _SCHEMA, busy_timeout_s)

    def record(self, events: Sequence[Feedback]) -> FeedbackResult:
        """Store events that carry an ``arm``; a repeated ``event_id`` is a duplicate, not an error.

        The same ``event_id`` with different content is rejected (two clients disagree). Events
        without ``arm`` are rejected: use ``record_feedback`` to derive it from the config.
        """
        now = int(time.time())
        rows, rejected = [], []
        for e in events:
            if e.arm is None:
                rejected.append(f"feedback for user {e.user_id!r}: no arm; send the arm /recommend returned")
                continue
            ts = e.timestamp if e.timestamp is not None else now
            eid = e.event_id or "sha256:" + _digest(e.experiment, e.arm, e.user_id, e.item_id, e.kind, e.value, ts)
            rows.append((eid, e.experiment, e.arm, e.user_id, e.item_id, e.kind, e.value, ts, now))
        accepted, duplicate, conflicts = self._insert(rows)
        return FeedbackResult(accepted=accepted, duplicate=duplicate, rejected=rejected + conflicts)

    def _insert(self, rows: list[tuple[Any, ...]]) -> tuple[int, int, list[str]]:
        accepted = duplicate = 0
        conflicts: list[str] = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = self._conn.execute(
                        "INSERT OR IGNORE INTO feedback (event_id, experiment, arm, user_id, item_id, kind, value, "
                        "timestamp, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row,
                    )
                    if cur.rowcount == 1:
                        accepted += 1
                        continue
                    stored = self._conn.execute(
                        "SELECT experiment, arm, user_id, item_id, kind, value FROM feedback WHERE event_id = ?", (row[0],)
                    ).fetchone()
                    if tuple(stored) == tuple(row[1:7]):
                        duplicate += 1
                    else:
                        conflicts.append(f"event_id {row[0]!r} was already used for different feedback; give each event its own id")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return accepted, duplicate, conflicts

    def _insert_many(self, rows: list[tuple[Any, ...]]) -> int:
        """Bulk ``INSERT OR IGNORE`` (no conflict check): for trusted writers such as ``simulate``."""
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO feedback (event_id, experiment, arm, user_id, item_id, kind, value, "
                    "timestamp, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows,
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def per_user(self, experiment: str) -> pd.DataFrame:
        """One row per (user, arm) of ``experiment``: impressions, clicks, purchases, revenue."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT user_id, arm, SUM(kind = 'impression'), SUM(kind = 'click'), SUM(kind = 'purchase'), "
                "COALESCE(SUM(CASE WHEN kind = 'purchase' THEN value END), 0.0) "
                "FROM feedback WHERE experiment = ? GROUP BY user_id, arm",
                (experiment,),
            ).fetchall()
        frame = pd.DataFrame(rows, columns=["user_id", "arm", "impressions", "clicks", "purchases", "revenue"])
        return frame.astype({"impressions": np.int64, "clicks": np.int64, "purchases": np.int64, "revenue": np.float64})

    def count(self, experiment: str | None = None) -> int:
        with self._lock:
            if experiment is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])
            return int(self._conn.execute("SELECT COUNT(*) FROM feedback WHERE experiment = ?", (experiment,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def record_feedback(store: FeedbackStore, events: Sequence[Feedback], experiments: Sequence[ExperimentConfig]) -> FeedbackResult:
    """``POST /feedback`` in one call: check experiment and arm names, derive missing arms, store.

    An event naming an unknown experiment or an arm that experiment lacks is rejected with a
    reason; the others are stored.
    """
    by_name = {e.name: e for e in experiments}
    ok: list[Feedback] = []
    rejected: list[str] = []
    for i, e in enumerate(events):
        exp = by_name.get(e.experiment)
        if exp is None:
            rejected.append(f"feedback[{i}]: unknown experiment {e.experiment!r}; known: {', '.join(by_name) or 'none'}")
            continue
        arms = [a.name for a in exp.arms]
        if e.arm is None:
            e = e.model_copy(update={"arm": assign_arm(exp, e.user_id)})
        elif e.arm not in arms:
            rejected.append(f"feedback[{i}]: experiment {e.experiment!r} has no arm {e.arm!r}; arms: {', '.join(arms)}")
            continue
        ok.append(e)
    result = store.record(ok)
    return FeedbackResult(result.accepted, result.duplicate, rejected + result.rejected)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
