"""The online history store in Redis, for several machines serving one application.

Every ingress replica, on every host, reads and writes the same Redis, so an event posted to
any replica shapes the next ``/recommend`` wherever it lands. The semantics are the SQLite
store's (``serving/history.py``): idempotent on ``event_id``, derived ids for events without one,
the server's clock for events without a timestamp, a reused id with other content rejected.

Layout, under a key prefix (default ``towerline:``):

- ``<prefix>event:<event_id>`` → the event's content digest, written with ``SET NX``: the first
  writer wins, a retry finds its own digest (duplicate), another client's event finds a different
  one (rejected).
- ``<prefix>history:<user_id>`` → a sorted set scored by timestamp whose members start with a
  zero-padded arrival number, so events of one second keep their arrival order, as in SQLite.
  Trimmed to the newest ``keep_per_user`` events: the user tower reads at most ``max_len``, and
  an unbounded list per user would let one bot fill the server's memory.
- ``<prefix>seq`` and ``<prefix>count`` → the arrival counter and the number of stored events.

One event is one Lua script (check the id, add, trim, count), which Redis runs atomically, so two
replicas posting the same retried batch at the same moment store it once. A batch is one pipeline:
one round trip however many events it holds. The script touches keys of several users, so a Redis
Cluster is not supported; one primary (with replicas or Sentinel for failover) is the deployment.

    store = RedisHistoryStore("redis://127.0.0.1:6379/0")
    store.append([Event(user_id="u1", item_id="i9", event_type="view")])
    store.recent("u1", 50)  # [HistoryEvent(item_id='i9', event_type='view', timestamp=...)]
"""

from __future__ import annotations

import logging
import time
from typing import Sequence
from urllib.parse import urlsplit

from towerline.errors import TowerlineError
from towerline.features.contracts import Event
from towerline.serving.history import ROW_ERRORS, AppendResult, HistoryEvent, conflict_reason, identify, unstorable_reason

log = logging.getLogger(__name__)

# KEYS: event key, history key, seq key, count key; ARGV: digest, timestamp, event type, item id, keep.
# Returns 1 stored, 0 duplicate (same digest), -1 the id belongs to another event.
_APPEND = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  local seq = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[2], ARGV[2], string.format('%020d', seq) .. '\\t' .. ARGV[3] .. '\\t' .. ARGV[4])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[5]) + 1))
  redis.call('INCR', KEYS[4])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return 0
end
return -1
"""


def redact(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    host = parts.hostname or parts.path or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path if parts.hostname else ''}"


class RedisHistoryStore:
    """Behaviour events per user in one Redis shared by every serving machine."""

    def __init__(self, url: str, *, keep_per_user: int = 1000, prefix: str = "towerline:",
                 socket_timeout_s: float = 2.0) -> None:
        try:
            import redis
        except ImportError:  # an optional dependency: only deployments on several machines need it
            raise TowerlineError(
                "the Redis history store needs the redis client: pip install 'towerline[redis]'"
            ) from None
        if keep_per_user < 1:
            raise ValueError(f"keep_per_user must be >= 1, got {keep_per_user}")
        self.url = redact(url)
        self.keep_per_user = keep_per_user
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=socket_timeout_s)
        try:
            self._redis.ping()
        except redis.RedisError as e:
            raise TowerlineError(f"history store: cannot reach Redis at {self.url}: {e}") from None
        self._append = self._redis.register_script(_APPEND)
        log.info("history store: %s (newest %d events per user)", self.url, keep_per_user)

    def _history_key(self, user_id: str) -> str:
        return f"{self.prefix}history:{user_id}"

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult()
        now = int(time.time())
        seq_key, count_key = f"{self.prefix}seq", f"{self.prefix}count"
        pipe = self._redis.pipeline(transaction=False)
        queued: list[tuple[int, str]] = []  # (position, event_id) of each script call in the pipeline
        rejected: list[str] = []
        for pos, e in enumerate(events):
            try:  # encode here, row by row: one unencodable value would otherwise fail the whole pipeline
                event_id, digest, e = identify(e, now)
                keys = [f"{self.prefix}event:{event_id}", self._history_key(e.user_id), seq_key, count_key]
                args = [digest, int(e.timestamp), e.event_type, e.item_id, self.keep_per_user]
                for part in (*keys, *args):
                    str(part).encode("utf-8")
            except ROW_ERRORS as err:
                rejected.append(unstorable_reason(pos, err))
                continue
            self._append(keys=keys, args=args, client=pipe)
            queued.append((pos, event_id))
        outcomes = pipe.execute(raise_on_error=False) if queued else []
        accepted = duplicate = 0
        for (pos, event_id), outcome in zip(queued, outcomes):
            if isinstance(outcome, Exception):  # that script failed; the others ran
                rejected.append(unstorable_reason(pos, outcome))
            elif outcome == 1:
                accepted += 1
            elif outcome == 0:
                duplicate += 1
            else:
                rejected.append(conflict_reason(event_id))
        if rejected:
            log.info("history store: %d rejected of %d", len(rejected), len(events))
        return AppendResult(accepted=accepted, duplicate=duplicate, rejected=rejected)

    def recent(self, user_id: str, n: int) -> list[HistoryEvent]:
        if n <= 0:
            return []
        rows = self._redis.zrevrange(self._history_key(user_id), 0, n - 1, withscores=True)
        out = []
        for member, score in reversed(rows):
            _, event_type, item_id = member.split("\t", 2)
            out.append(HistoryEvent(item_id, event_type, int(score)))
        return out

    def count(self) -> int:
        return int(self._redis.get(f"{self.prefix}count") or 0)

    def close(self) -> None:
        self._redis.close()
