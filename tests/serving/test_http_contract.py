"""The HTTP contract of the ingress, in-process (FastAPI app without Ray): no input gets a 500,
strict types, bounded values, summarised batch answers, one error table, opaque 500s, safe logs.

The requests here are the ones that answered 500 or were wrongly accepted before (issue #14).
"""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from http_support import assert_problem, in_process_app

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    replica, app = in_process_app(tiny_run, tmp_path_factory.mktemp("http"))
    yield replica, app
    replica.close()


@pytest.fixture
def client(app):
    with TestClient(app[1], raise_server_exceptions=False) as c:
        yield c


def raw(client: TestClient, path: str, text: str):
    """POST ``text`` exactly as written: JSON escapes such as \\ud800 reach the server unparsed."""
    return client.post(path, content=text.encode("ascii"), headers=JSON)


def event(**kw):
    return {"user_id": "u000001", "item_id": "i00001", **kw}


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("path,text,field", [
    ("/recommend", '{"user_id":"u000001","exclude":["\\ud800"]}', "exclude.0"),
    ("/recommend", '{"user_id":"\\ud800"}', "user_id"),
    ("/recommend", '{"user_id":"u\\u0000"}', "user_id"),
    ("/admin/reload", '{"model":"\\ud800"}', "model"),
    ("/admin/reload", '{"index_dir":"/tmp\\u0000"}', "index_dir"),
    ("/admin/reload", '{"index_dir":"\\ud800"}', "index_dir"),
    ("/audiences", '{"item_id":"\\udfff"}', "item_id"),
    ("/recommend", '{"user_id":"u","\\ud800":1}', "body"),  # a key that is no text: the body is refused whole
])
def test_unencodable_or_nul_text_is_422_naming_the_field(client, path, text, field):
    body = assert_problem(raw(client, path, text), 422)
    assert any(field in e["field"] for e in body["errors"]), body


def test_unencodable_event_fields_reject_that_event_only(client):
    text = '[{"user_id":"u000001","item_id":"\\ud800"},{"user_id":"u000001","item_id":"i00001","event_id":"ok-text-1"}]'
    body = raw(client, "/events", text).json()
    assert (body["accepted"], body["rejected_count"]) == (1, 1)
    assert "item_id" in body["rejected"][0]


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("k", ["5", True, 5.0, 0, 201, None])
def test_k_must_be_an_integer_in_range(client, k):
    body = assert_problem(client.post("/recommend", json={"user_id": "u000001", "k": k}), 422)
    assert "k" in [e["field"] for e in body["errors"]]


@pytest.mark.parametrize("ts", [9223372036854775808, 9223372036854775807, -1, 4_102_444_801,
                                "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "yesterday", "12345",
                                True, 1.5e9])
def test_timestamps_outside_1970_2100_or_not_int_or_iso_are_rejected_and_the_rest_of_the_batch_stored(client, ts):
    good = event(event_id=f"good-{ts!r}", timestamp=1_700_000_000)
    body = client.post("/events", json=[event(event_id=f"bad-{ts!r}", timestamp=ts), good]).json()
    assert body["accepted"] == 1 and body["rejected_count"] == 1, body
    assert "timestamp" in body["rejected"][0] and "event 0" in body["rejected"][0]


def test_iso_and_int_timestamps_are_accepted(client):
    body = client.post("/events", json=[event(event_id="iso-1", timestamp="2024-05-01T12:00:00Z"),
                                        event(event_id="iso-2", timestamp="2024-05-01T12:00:00"),
                                        event(event_id="int-1", timestamp=0)]).json()
    assert (body["accepted"], body["rejected_count"]) == (3, 0), body


def test_the_same_timestamp_in_feedback_is_rejected_not_500(client):
    row = {"experiment": "home-feed", "arm": "control", "user_id": "u000001", "kind": "click"}
    body = client.post("/feedback", json=[{**row, "timestamp": 9223372036854775808, "event_id": "f-big"}]).json()
    assert body["accepted"] == 0 and body["rejected_count"] == 1 and "timestamp" in body["rejected"][0]


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e400", "-1", '"12"', "true"])
def test_value_must_be_a_finite_non_negative_number(client, value):
    text = f'[{{"user_id":"u000001","item_id":"i00001","event_type":"purchase","value":{value},"event_id":"v-{len(value)}"}}]'
    body = raw(client, "/events", text).json()
    assert body["rejected_count"] == 1 and "value" in body["rejected"][0], body


# ----------------------------------------------------------------------------- unknown fields


@pytest.mark.parametrize("path,payload,field", [
    ("/recommend", {"user_id": "u", "colour": "red"}, "colour"),
    ("/recommend", {"user_id": "u", "context": {"consent": False, "page": "home"}}, "context.page"),
    ("/audiences", {"item_id": "i00001", "sizee": 5}, "sizee"),
    ("/admin/reload", {"modle": "x"}, "modle"),
])
def test_unknown_fields_are_422_naming_them(client, path, payload, field):
    body = assert_problem(client.post(path, json=payload), 422)
    assert field in [e["field"] for e in body["errors"]], body


def test_unknown_event_field_rejects_the_event_naming_it(client):
    body = client.post("/events", json=[event(colour="red")]).json()
    assert body["rejected_count"] == 1 and "colour" in body["rejected"][0]


# ----------------------------------------------------------------------------- batches


def test_a_batch_over_max_batch_is_413_saying_the_limit(client):
    text = "[" + ",".join(["{}"] * 100_000) + "]"
    assert len(text) < 400_000
    body = assert_problem(client.post("/events", content=text, headers=JSON), 413, "10000")
    assert body["limit"] == 10_000
    assert_problem(client.post("/feedback", content=text, headers=JSON), 413, "10000")


def test_rejections_are_summarised_not_echoed(client):
    text = "[" + ",".join(["{}"] * 10_000) + "]"
    resp = client.post("/events", content=text, headers=JSON)
    body = resp.json()
    assert resp.status_code == 200 and len(resp.content) < 10_000, len(resp.content)
    assert body["rejected_count"] == 10_000 and len(body["rejected"]) == 20
    assert body["rejected_by_reason"] == {"item_id: missing": 10_000, "user_id: missing": 10_000}
    assert (body["accepted"], body["duplicate"]) == (0, 0)


def test_rows_that_are_not_objects_are_rejected_by_position(client):
    body = client.post("/events", json=[1, "x", None, event(event_id="row-ok")]).json()
    assert body["accepted"] == 1 and body["rejected_count"] == 3
    assert body["rejected"][0].startswith("event 0")


def test_unknown_field_names_do_not_grow_the_summary(client):
    rows = [event(**{f"f{i}": 1}) for i in range(200)]
    body = client.post("/events", json=rows).json()
    assert body["rejected_by_reason"] == {"(unknown field): extra_forbidden": 200}


# ----------------------------------------------------------------------------- errors


def test_every_towerline_error_has_a_status_in_the_one_table():
    import towerline.marketing.routes  # noqa: F401  (every module that defines an error type)
    import towerline.serving.app  # noqa: F401
    from towerline.errors import TowerlineError
    from towerline.serving.errors import STATUS, status_for

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = list(subclasses(TowerlineError))
    assert found and all(400 <= status_for(c) < 500 for c in found)
    assert all(c in STATUS for c in found if c.__module__.startswith("towerline.errors")), STATUS


def test_an_unexpected_error_is_an_opaque_500_whose_id_the_log_carries(app, client, monkeypatch, caplog):
    replica, _ = app

    def boom(*_a, **_k):
        raise RuntimeError(f"secret /var/lib/towerline/db pid {12345}")

    monkeypatch.setattr(replica.store, "append", boom)
    with caplog.at_level(logging.ERROR):
        resp = client.post("/events", json=[event(event_id="boom")])
    body = assert_problem(resp, 500)
    assert "secret" not in resp.text and "/var/lib" not in resp.text and "12345" not in resp.text
    assert body["error_id"] and any(body["error_id"] in r.getMessage() for r in caplog.records)


def test_a_log_record_with_a_lone_surrogate_is_written_escaped(tmp_path):
    from towerline.text import SafeRecords

    log = logging.getLogger("towerline.test.safe")
    handler = logging.FileHandler(tmp_path / "log.txt", encoding="utf-8")
    handler.addFilter(SafeRecords())
    log.addHandler(handler)
    try:
        log.warning("reload of %s failed", "\ud800/x\n")
        try:
            raise ValueError("bad \udfff")
        except ValueError:
            log.exception("with a traceback")
    finally:
        log.removeHandler(handler)
        handler.close()
    text = (tmp_path / "log.txt").read_text(encoding="utf-8")
    assert "\\ud800" in text and "\\udfff" in text


def test_invalid_json_is_422_and_body_not_a_list_is_422(client):
    assert_problem(client.post("/recommend", content=b'{"user_id": ', headers=JSON), 422, "invalid JSON")
    assert_problem(client.post("/events", json={"user_id": "u"}), 422, "body")
