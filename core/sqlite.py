"""One way to open the service's SQLite files (history store, feedback store).

WAL mode lets the ingress read while another request writes; ``synchronous=NORMAL`` with WAL
survives an application crash and avoids an fsync per request; one connection shared across
threads behind a lock, since ``asyncio.to_thread`` calls land on different threads.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


def open_sqlite(path: str | Path, schema: str, busy_timeout_s: float = 5.0) -> tuple[sqlite3.Connection, threading.Lock]:
    """(connection in autocommit mode, the lock that guards it), with ``schema`` applied."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    conn = sqlite3.connect(str(p), timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
    with lock:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(schema)
    return conn, lock
