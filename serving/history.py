"""The online history store: behaviour events that arrived after training, per user.

``POST /events`` appends here and ``/recommend`` reads the user's newest events back, so an event
posted now changes the next recommendation without retraining (the user tower reads the history
at request time; only the weights are frozen).

Two implementations sit behind one ``Protocol`` (``append`` / ``recent``):

- ``SQLiteHistoryStore`` — the embedded default, one file, no server. WAL mode lets several
  processes (Serve replicas on one machine) read while one writes; a UNIQUE index on
  ``event_id`` makes ``append`` idempotent, so a client may retry a batch after a timeout.
- ``RedisHistoryStore`` (``serving/redis_history.py``) — the store for several machines: every
  ingress replica on every host reads and writes one Redis, so an event posted to any of them
  shapes the next ``/recommend`` wherever it lands. ``open_history_store`` picks one from the
  settings (``history_redis_url`` set → Redis, else the SQLite file ``history_db``).

Events without an ``event_id`` get one derived from their content (sha256 of user, item, time,
type, value and channel), so an identical retry is still a duplicate. Events without a timestamp
get the server's clock (epoch seconds) *before* such an id is derived: a retry within the same
second deduplicates, the same action a minute later counts again. An explicit ``event_id`` sent
again with the same content (as sent, so without a timestamp too) is a duplicate whenever it
arrives; with other content it is rejected, because one of the two clients is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, Sequence

from towerline.features.contracts import Event
from towerline.sqlite import open_sqlite
from towerline.text import safe_text
if TYPE_CHECKING:
    from towerline.serving.settings import ServeSettings

log = logging.getLogger(__name__)


class HistoryEvent(NamedTuple):
    """One stored step, as ``recent`` returns it."""

    item_id: str
    event_type: str
    timestamp: int


@dataclass(frozen=True)
class AppendResult:
    """Counts of one ``append``; ``rejected`` holds one reason per rejected event."""

    accepted: int = 0
    duplicate: int = 0
    rejected: list[str] = field(default_factory=list)


class HistoryStore(Protocol):
    def append(self, events: Sequence[Event]) -> AppendResult:
        """Store events; an ``event_id`` seen before is a duplicate, not an error."""
        ...

    def recent(self, user_id: str, n: int) -> list[HistoryEvent]:
        """The user's newest ``n`` events, oldest first (newest last, as the user tower reads them)."""
        ...

    def count(self) -> int:
        """Events stored (for tests and operators)."""
        ...

    def close(self) -> None: ...


def event_digest(e: Event) -> str:
    """sha256 of an event's content (not its ``event_id``): the derived id and the conflict check."""
    payload = [e.user_id, e.item_id, e.timestamp, e.event_type, e.value, e.channel]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


class Identified(NamedTuple):
    """An incoming event as every store keeps it: its id, its content digest, a timestamp filled in."""

    event_id: str
    digest: str
    event: Event


def identify(e: Event, now: int) -> Identified:
    """The id and digest the idempotency rules above give ``e``, and ``e`` with a timestamp.

    The digest is taken as sent (before the clock fills a missing timestamp), so a retry of an
    identified event without timestamp still matches its first copy whenever it arrives.
    """
    digest = event_digest(e)
    if e.timestamp is None:
        e = e.model_copy(update={"timestamp": now})
    return Identified(e.event_id or f"sha256:{event_digest(e)}", digest, e)


# What one row's values can raise while being bound or encoded (an int past 64 bits, text that does
# not encode, a NOT NULL or type constraint); a disk or lock error is not a row's fault and still
# fails the batch.
ROW_ERRORS = (OverflowError, ValueError, TypeError, UnicodeError, sqlite3.IntegrityError, sqlite3.InterfaceError,
              sqlite3.DataError)


def unstorable_reason(pos: int, error: BaseException) -> str:
    """The rejection line of an event the store could not write (the cause is logged, not echoed)."""
    log.warning("history store: event %d of a batch not stored: %s", pos, type(error).__name__)
    return f"event {pos} of the valid events could not be stored ({type(error).__name__}); the others were"


def conflict_reason(event_id: str) -> str:
    return f"event_id {safe_text(event_id, 260)!r} was already used for a different event; give each event its own event_id"


def open_history_store(settings: "ServeSettings") -> HistoryStore:
    """The store the settings name: Redis when ``history_redis_url`` is set, else the SQLite file."""
    if settings.history_redis_url:
        from towerline.serving.redis_history import RedisHistoryStore

        return RedisHistoryStore(settings.history_redis_url, keep_per_user=settings.history_keep_per_user)
    return SQLiteHistoryStore(settings.history_db)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    item_id    TEXT    NOT NULL,
    event_type TEXT    NOT NULL,
    timestamp  INTEGER NOT NULL,
    value      REAL,
    channel    TEXT,
    received   INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events(event_id);
CREATE INDEX IF NOT EXISTS events_user_time ON events(user_id, timestamp, seq);
"""


class SQLiteHistoryStore:
    """The embedded history store: one SQLite file in WAL mode, safe across threads and processes.

    One connection per store object, guarded by a lock (SQLite serialises writers anyway, and a
    request touches the store for well under a millisecond). Example::

        store = SQLiteHistoryStore("history.sqlite")
        store.append([Event(user_id="u1", item_id="i9", event_type="view")])
        store.recent("u1", 50)  # [HistoryEvent(item_id='i9', event_type='view', timestamp=...)]
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._conn, self._lock = open_sqlite(self.path, _SCHEMA, busy_timeout_s)
        log.info("history store: %s", self.path)

    def append(self, events: Sequence[Event]) -> AppendResult:
        now = int(time.time())
        accepted = duplicate = 0
        rejected: list[str] = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for pos, e in enumerate(events):
                    try:  # one event that cannot be stored is rejected alone; the batch goes on
                        event_id, digest, e = identify(e, now)
                        cur = self._conn.execute(
                            "INSERT OR IGNORE INTO events (event_id, digest, user_id, item_id, event_type, timestamp, "
                            "value, channel, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (event_id, digest, e.user_id, e.item_id, e.event_type, e.timestamp, e.value, e.channel, now),
                        )
                    except ROW_ERRORS as err:
                        rejected.append(unstorable_reason(pos, err))
                        continue
                    if cur.rowcount == 1:
                        accepted += 1
                        continue
                    (stored,) = self._conn.execute("SELECT digest FROM events WHERE event_id = ?", (event_id,)).fetchone()
                    if stored == digest:
                        duplicate += 1
                    else:
                        rejected.append(conflict_reason(event_id))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if rejected:
            log.info("history store: %d accepted, %d duplicate, %d rejected", accepted, duplicate, len(rejected))
        return AppendResult(accepted=accepted, duplicate=duplicate, rejected=rejected)

    def recent(self, user_id: str, n: int) -> list[HistoryEvent]:
        if n <= 0:
            return []
        with self._lock:
            rows = self._conn.execute(
                "SELECT item_id, event_type, timestamp FROM events WHERE user_id = ? "
                "ORDER BY timestamp DESC, seq DESC LIMIT ?",
                (user_id, n),
            ).fetchall()
        return [HistoryEvent(*r) for r in reversed(rows)]

    def count(self) -> int:
        """Stored events (for ``/healthz`` and tests)."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
