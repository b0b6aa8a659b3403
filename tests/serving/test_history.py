"""serving/history.py and redis_history.py: idempotent appends, derived ids, order, concurrent writers.

The ``store`` fixture runs each contract test against SQLite and against a real redis-server.
"""

from __future__ import annotations

import threading

import pytest

from towerline.errors import ConfigError, TowerlineError
from towerline.features.contracts import Event
from towerline.serving.history import SQLiteHistoryStore, open_history_store
from towerline.serving.redis_history import RedisHistoryStore, redact
from towerline.serving.settings import settings_from


def ev(item: str, ts: int | None, **kw) -> Event:
    return Event(user_id=kw.pop("user", "u1"), item_id=item, timestamp=ts, **kw)


def test_same_event_id_twice_is_a_duplicate(store):
    first = store.append([ev("i1", 10, event_id="e1")])
    again = store.append([ev("i1", 10, event_id="e1"), ev("i2", 11, event_id="e2")])
    assert (first.accepted, first.duplicate) == (1, 0)
    assert (again.accepted, again.duplicate, again.rejected) == (1, 1, [])
    assert store.count() == 2


def test_event_without_id_is_deduplicated_by_content(store):
    store.append([ev("i1", 10, event_type="view")])
    res = store.append([ev("i1", 10, event_type="view"), ev("i1", 10, event_type="cart")])
    assert (res.accepted, res.duplicate) == (1, 1)


def test_reused_event_id_with_other_content_is_rejected_with_a_reason(store):
    store.append([ev("i1", 10, event_id="e1")])
    res = store.append([ev("i2", 10, event_id="e1")])
    assert res.accepted == 0 and len(res.rejected) == 1
    assert "e1" in res.rejected[0] and "different event" in res.rejected[0]


def test_recent_returns_newest_n_oldest_first_for_that_user_only(store):
    store.append([ev("i3", 30), ev("i1", 10), ev("i2", 20), ev("x", 40, user="u2")])
    assert [e.item_id for e in store.recent("u1", 2)] == ["i2", "i3"]
    assert [e.timestamp for e in store.recent("u1", 10)] == [10, 20, 30]
    assert store.recent("nobody", 5) == []


def test_missing_timestamp_gets_the_server_clock(store):
    store.append([ev("i1", None)])
    (e,) = store.recent("u1", 1)
    assert e.timestamp > 1_600_000_000


def test_store_survives_reopen_and_a_second_writer(tmp_path):
    path = tmp_path / "h.sqlite"
    a, b = SQLiteHistoryStore(path), SQLiteHistoryStore(path)
    a.append([ev("i1", 1, event_id="e1")])
    assert b.append([ev("i1", 1, event_id="e1")]).duplicate == 1
    a.close(), b.close()
    c = SQLiteHistoryStore(path)
    assert c.count() == 1
    c.close()


def test_concurrent_appends_from_threads_lose_nothing(store):
    def worker(t: int) -> None:
        for i in range(25):
            store.append([ev(f"i{i}", i, event_id=f"t{t}-{i}")])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert store.count() == 100


def test_retry_of_an_identified_event_without_timestamp_is_a_duplicate_later(store, monkeypatch):
    import towerline.serving.history as h

    store.append([ev("i1", None, event_id="e1")])
    monkeypatch.setattr(h.time, "time", lambda: 4_000_000_000.0)  # the retry arrives much later
    res = store.append([ev("i1", None, event_id="e1")])
    assert (res.accepted, res.duplicate, res.rejected) == (0, 1, [])


def test_events_of_one_second_keep_their_arrival_order(store):
    store.append([ev("a", 5), ev("b", 5), ev("c", 5)])
    store.append([ev("d", 5)])
    assert [e.item_id for e in store.recent("u1", 10)] == ["a", "b", "c", "d"]


def test_two_redis_clients_are_two_machines_sharing_one_history(redis_url):
    a = RedisHistoryStore(redis_url, prefix="t:shared:")
    b = RedisHistoryStore(redis_url, prefix="t:shared:")
    a.append([ev("i1", 1, event_id="e1", event_type="cart")])
    assert b.append([ev("i1", 1, event_id="e1", event_type="cart")]).duplicate == 1
    assert b.recent("u1", 5) == a.recent("u1", 5) and a.recent("u1", 5)[0].event_type == "cart"
    a.close(), b.close()
    assert RedisHistoryStore(redis_url, prefix="t:shared:").count() == 1  # the server keeps it, not the client


def test_redis_keeps_the_newest_events_per_user_only(redis_url):
    store = RedisHistoryStore(redis_url, keep_per_user=3, prefix="t:trim:")
    store.append([ev(f"i{t}", t) for t in range(10)])
    assert [e.item_id for e in store.recent("u1", 100)] == ["i7", "i8", "i9"]
    assert store.append([ev("i9", 9)]).duplicate == 1  # the id outlives the trimmed step


def test_unreachable_redis_is_a_clear_error_without_the_password():
    with pytest.raises(TowerlineError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0") as err:
        RedisHistoryStore("redis://:hunter2@127.0.0.1:1/0", socket_timeout_s=0.5)
    assert "hunter2" not in str(err.value)
    assert redact("redis://user:pw@cache:6380/2") == "redis://cache:6380/2"


def test_settings_choose_the_store_and_reject_a_bad_url(tmp_path, redis_url):
    sqlite = open_history_store(settings_from(history_db=str(tmp_path / "h.sqlite")))
    redis = open_history_store(settings_from(history_redis_url=redis_url))
    assert isinstance(sqlite, SQLiteHistoryStore) and isinstance(redis, RedisHistoryStore)
    sqlite.close(), redis.close()
    with pytest.raises(ConfigError, match="history_redis_url.*redis://"):
        settings_from(history_redis_url="localhost:6379")


def test_serve_command_rejects_a_bad_history_url_in_one_line_before_starting(tmp_path, capsys):
    from towerline.cli import main

    assert main(["serve", "--model", str(tmp_path), "--history-redis-url", "localhost:6379"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: serve setting 'history_redis_url'") and "Traceback" not in err


def test_an_event_the_store_cannot_write_is_rejected_alone(store):
    # model_construct skips validation: what a bug upstream (or a future field) could hand the store
    bad = Event.model_construct(user_id="u1", item_id="\ud800", timestamp=10, event_type="view", value=None,
                                event_id="bad-1", channel=None)
    res = store.append([ev("i1", 9, event_id="ok-1"), bad, ev("i2", 11, event_id="ok-2")])
    assert (res.accepted, res.duplicate, len(res.rejected)) == (2, 0, 1)
    assert "event 1" in res.rejected[0]
    assert [e.item_id for e in store.recent("u1", 10)] == ["i1", "i2"]
