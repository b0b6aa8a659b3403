"""A real Ray Serve application on 127.0.0.1: endpoints, bad input, events, reload under load.

The apps are deployed into the run's one Ray and Serve (``serve_base`` in conftest.py) and deleted at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest


pytestmark = pytest.mark.serve

PROBLEM = "application/problem+json"
TOKEN = "t0k3n-for-the-real-serve-tests-42"


@pytest.fixture(scope="module")
def served(serve_base, tiny_run, tmp_path_factory):
    """(base_url, tiny_run) of the app serving the tiny bundle; deleted after the module."""
    from ray import serve

    from towerline.serving.app import AppArgs, build_app

    tmp = tmp_path_factory.mktemp("serve")
    try:
        args = AppArgs(
            model=str(tiny_run.bundle_dir),
            tracking_uri=tiny_run.tracking_uri,
            # reloads may load bundle folders anywhere under pytest's temp root (the tests copy bundles there)
            settings={"history_db": str(tmp / "history.sqlite"), "feedback_db": str(tmp / "feedback.sqlite"),
                      "models_root": str(tmp_path_factory.getbasetemp()),
                      "ingress_replicas": 1},  # two replicas are tested in the `shared_redis` app below
        )
        serve.run(build_app(args), name="towerline", route_prefix="/")
        yield serve_base, tiny_run
    finally:
        serve.delete("towerline")


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0], timeout=30) as c:
        yield c


def a_known_user(tiny_run) -> str:
    from towerline.training.bundle import load_bundle

    b = load_bundle(tiny_run.bundle_dir)
    row = int(np.flatnonzero(b.histories.lengths >= 3)[0])
    return str(b.vocabs.users.decode([b.histories.user_idx[row]])[0])


def assert_problem(resp: httpx.Response, status: int, mentions: str = "") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert mentions in resp.text
    return body


def test_recommend_returns_k_scored_items_with_version_and_arm(client, served):
    user = a_known_user(served[1])
    resp = client.post("/recommend", json={"user_id": user, "k": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["items"]) == 5 and body["fallback"] is False and body["arm"] == "default"
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert len(client.post("/recommend", json={"user_id": user}).json()["items"]) == 10  # k defaults to 10


def test_unknown_user_gets_popular_items_with_fallback_true(client):
    body = client.post("/recommend", json={"user_id": "nobody-ever", "k": 4}).json()
    assert body["fallback"] is True and len(body["items"]) == 4


def test_similar_items_and_unknown_item_404(client):
    body = client.get("/items/i00003/similar", params={"k": 3}).json()
    assert len(body["items"]) == 3 and "i00003" not in [i["item_id"] for i in body["items"]]
    assert_problem(client.get("/items/no-such-item/similar"), 404, "no-such-item")


def test_posted_event_changes_next_recommendation(client, served):
    user = a_known_user(served[1])
    before = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
    top = before[0]["item_id"]
    event = {"user_id": user, "item_id": top, "event_type": "purchase", "timestamp": 2_000_000_000, "event_id": "p-1"}
    assert client.post("/events", json=[event]).json() == {"accepted": 1, "duplicate": 0, "rejected": [],
                                                           "rejected_count": 0, "rejected_by_reason": {}}
    after = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
    assert top not in [i["item_id"] for i in after]
    assert [i["score"] for i in after] != [i["score"] for i in before]


def test_duplicate_event_ids_are_counted_and_invalid_events_rejected_with_reasons(client):
    events = [
        {"user_id": "dup-user", "item_id": "i00001", "event_id": "d-1", "timestamp": 5},
        {"user_id": "dup-user", "item_id": "i00001", "event_id": "d-1", "timestamp": 5},
        {"user_id": "dup-user", "timestamp": 5},
        {"user_id": "dup-user", "item_id": "i00002", "timestamp": -3},
    ]
    body = client.post("/events", json=events).json()
    assert (body["accepted"], body["duplicate"]) == (1, 1)
    assert len(body["rejected"]) == 2 and body["rejected_count"] == 2
    assert "event 2" in body["rejected"][0] and "item_id" in body["rejected"][0]
    assert "event 3" in body["rejected"][1] and "timestamp" in body["rejected"][1]
    again = client.post("/events", json=events[:1]).json()
    assert (again["accepted"], again["duplicate"]) == (0, 1)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"user_id": "u", "k": 0}, "k"),
        ({"user_id": "u", "k": 201}, "k"),
        ({"user_id": "u", "k": "ten"}, "k"),
        ({"k": 3}, "user_id"),
        ({"user_id": "u", "colour": "red"}, "colour"),
        ({"user_id": "u", "exclude": "i00001"}, "exclude"),
        ([1, 2], "body"),
    ],
)
def test_invalid_recommend_fields_are_422_naming_the_field(client, payload, field):
    body = assert_problem(client.post("/recommend", json=payload), 422)
    assert field in [e["field"] for e in body["errors"]] or field in body["detail"]


def test_invalid_json_is_422(client):
    resp = client.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert_problem(resp, 422, "invalid JSON")


def test_events_body_that_is_not_a_list_is_422(client):
    assert_problem(client.post("/events", json={"user_id": "u", "item_id": "i"}), 422, "body")


def test_oversized_body_is_413_declared_or_chunked(client):
    big = b'[' + b' ' * (1 << 20) + b']'
    assert_problem(client.post("/events", content=big, headers={"content-type": "application/json"}), 413, "limit")

    def chunks():
        for _ in range(20):
            yield b" " * 65536

    assert_problem(client.post("/events", content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    resp = client.post("/recommend", content=b'{"user_id": "u"}', headers=headers)
    assert_problem(resp, 415, "application/json")


def test_bad_similar_query_is_422(client):
    assert_problem(client.get("/items/i00003/similar", params={"k": 0}), 422, "k")
    assert_problem(client.get("/items/i00003/similar", params={"k": "many"}), 422, "k")


def test_health_version_and_docs(client, served):
    assert client.get("/healthz").json()["status"] == "ok"
    v = client.get("/version").json()
    assert v["model_name"] == "tiny-retriever" and v["index_kind"] == "flat" and v["item_count"] > 0
    assert client.get("/docs").status_code == 200
    assert "/recommend" in client.get("/openapi.json").json()["paths"]


def test_corrupt_index_is_refused_and_old_model_keeps_serving(client, served, tmp_path):
    from towerline.training.bundle import load_bundle
    from towerline.config import IndexConfig
    from towerline.serving.index import build_index, save_index

    bundle = tmp_path / "bundle"
    shutil.copytree(served[1].bundle_dir, bundle)
    save_index(build_index(load_bundle(bundle).item_embeddings, IndexConfig()), bundle / "index", {})
    raw = bytearray((bundle / "index" / "index.faiss").read_bytes())
    raw[-5] ^= 0xFF
    (bundle / "index" / "index.faiss").write_bytes(bytes(raw))
    before = client.get("/version").json()
    body = assert_problem(client.post("/admin/reload", json={"model": str(bundle)}), 409, "still serving")
    assert str(tmp_path) not in body["detail"] and body["error_id"]  # the cause is in the log, not the answer
    assert client.get("/version").json() == before
    assert client.post("/recommend", json={"user_id": "u"}).status_code == 200


def test_reload_under_concurrent_requests_fails_no_request(client, served):
    base, tiny_run = served
    user = a_known_user(tiny_run)
    stop = threading.Event()
    statuses: list[int] = []
    versions: set = set()

    def hammer() -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/recommend", json={"user_id": user, "k": 5})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])

    registry_uri = f"models:/{tiny_run.model_name}/{tiny_run.model_version}"
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        time.sleep(0.5)
        first = client.post("/admin/reload", json={"model": registry_uri}, timeout=120)
        time.sleep(0.5)
        second = client.post("/admin/reload", json={"model": str(tiny_run.bundle_dir)}, timeout=120)
        time.sleep(0.5)
        stop.set()
        [f.result(timeout=60) for f in futures]
    assert first.status_code == 200, first.text
    assert first.json()["current"]["model_version"] == str(tiny_run.model_version)
    assert second.status_code == 200, second.text
    assert len(statuses) > 10 and set(statuses) == {200}
    assert str(tiny_run.model_version) in versions  # requests were served by the new version too


def test_serve_yaml_is_a_valid_config_whose_args_build_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from towerline.serving.app import AppArgs, build_app

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app_cfg,) = config.applications
    assert app_cfg.import_path == "towerline.serving.app:build_app"
    args = AppArgs.model_validate(app_cfg.args)
    app = build_app(args)  # binding checks names and arguments without starting Ray
    deployed = {d.name for d in app_cfg.deployments}
    assert deployed == {"Ingress", "Retriever", "Ranker"}
    assert app is not None


def test_no_input_of_issue_14_gets_a_500_over_real_http(client):
    """The requests that answered 500 before, through Ray Serve's proxy (the in-process suite has the rest)."""
    json_headers = {"content-type": "application/json"}
    for path, text in [
        ("/recommend", '{"user_id":"u000001","exclude":["\\ud800"]}'),
        ("/admin/reload", '{"model":"\\ud800"}'),
        ("/admin/reload", '{"index_dir":"/tmp\\u0000"}'),
        ("/admin/reload", '{"index_dir":"\\ud800"}'),
    ]:
        assert_problem(client.post(path, content=text.encode("ascii"), headers=json_headers), 422)
    big = '[{"user_id":"u000001","item_id":"i00001","timestamp":9223372036854775808,"event_id":"x"},' \
          '{"user_id":"u000001","item_id":"i00001","timestamp":1700000000,"event_id":"y"}]'
    body = client.post("/events", content=big, headers=json_headers).json()
    assert (body["accepted"] + body["duplicate"], body["rejected_count"]) == (1, 1)


@pytest.fixture(scope="module")
def secured(served, tmp_path_factory):
    """A second app in the same Serve instance with an API token (api_token_file), under /secure."""
    from ray import serve

    from towerline.serving.app import AppArgs, build_app

    base, tiny_run = served
    tmp = tmp_path_factory.mktemp("secure")
    (tmp / "token").write_text(TOKEN)
    args = AppArgs(model=str(tiny_run.bundle_dir), settings={
        "history_db": str(tmp / "h.sqlite"), "feedback_db": str(tmp / "f.sqlite"), "api_token_file": str(tmp / "token"),
        "ingress_replicas": 1})
    serve.run(build_app(args), name="secure", route_prefix="/secure")
    with httpx.Client(base_url=f"{base}/secure", timeout=30) as c:
        yield c
    serve.delete("secure")


def test_writes_need_the_bearer_token_over_real_http(secured):
    event = [{"user_id": "u000001", "item_id": "i00001", "event_id": "secure-1"}]
    resp = secured.post("/events", json=event)
    assert_problem(resp, 401)
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert_problem(secured.post("/events", json=event, headers={"authorization": "Bearer wrong-token"}), 403)
    assert_problem(secured.post("/admin/reload", json={}), 401)
    ok = secured.post("/events", json=event, headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["accepted"] == 1
    assert secured.post("/recommend", json={"user_id": "u000001", "k": 3}).status_code == 200  # reads stay open
    assert secured.get("/docs/assets/swagger-ui-bundle.js").status_code == 200


@pytest.fixture(scope="module")
def shared_redis(served, redis_url, tmp_path_factory):
    """A third app in the same Serve instance: two ingress replicas whose online history is one real
    Redis (no SQLite history they could share instead), under /shared."""
    from ray import serve

    from towerline.serving.app import AppArgs, build_app

    base, tiny_run = served
    tmp = tmp_path_factory.mktemp("shared")
    args = AppArgs(model=str(tiny_run.bundle_dir), tracking_uri=tiny_run.tracking_uri, settings={
        "history_redis_url": redis_url, "ingress_replicas": 2, "history_db": str(tmp / "unused.sqlite"),
        "feedback_db": str(tmp / "f.sqlite")})
    serve.run(build_app(args), name="shared", route_prefix="/shared")
    with httpx.Client(base_url=f"{base}/shared", timeout=30) as c:
        yield c, tiny_run
    serve.delete("shared")


def answers_of_both_replicas(client: httpx.Client, user: str) -> dict:
    """``{replica: item ids}`` of /recommend until both ingress replicas answered (at most 60 requests)."""
    from towerline.serving.app import REPLICA_HEADER

    seen: dict = {}
    for _ in range(60):
        response = client.post("/recommend", json={"user_id": user, "k": 10})
        assert response.status_code == 200, response.text
        seen.setdefault(response.headers[REPLICA_HEADER], [i["item_id"] for i in response.json()["items"]])
        if len(seen) == 2:
            return seen
    pytest.fail(f"60 requests reached one ingress replica only: {sorted(seen)}")


def test_event_posted_through_one_replica_changes_the_next_answer_of_the_other(shared_redis):
    """The router picks the replica; each answer names it (``X-Towerline-Replica``). Whichever replica the
    event reached, both answers must change: one of them learnt it through Redis."""
    client, tiny_run = shared_redis
    user = a_known_user(tiny_run)
    before = answers_of_both_replicas(client, user)
    first, second = before.values()
    assert first == second  # same model, same history: the same answer from either replica
    top = first[0]
    event = {"user_id": user, "item_id": top, "event_type": "purchase", "timestamp": 2_000_000_000,
             "event_id": "shared-redis-1"}
    assert client.post("/events", json=[event]).json()["accepted"] == 1
    after = answers_of_both_replicas(client, user)
    assert set(after) == set(before)
    for replica, items in after.items():
        assert top not in items, f"replica {replica} still recommends the purchased {top}"
        assert items != before[replica]
