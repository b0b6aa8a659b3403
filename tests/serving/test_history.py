"""serving/history.py: idempotent appends, derived ids, order, and concurrent writers."""

from __future__ import annotations

import threading

from towerline.features.contracts import Event
from towerline.serving.history import SQLiteHistoryStore


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
