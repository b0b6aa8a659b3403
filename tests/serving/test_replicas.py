"""Admin writes reach every ingress replica: a rollback that follows the moved alias, cold items over
HTTP (``POST /admin/items``), and a replica started afterwards.

One real Serve app on 127.0.0.1 with two ingress replicas serving ``models:/tiny-retriever@champion``
from its own SQLite MLflow store, where the tiny bundle is registered twice (versions 1 and 2, so
each answer's ``model_version`` says which one served it). Serve's router spreads the requests over
both replicas, so an admin write that reached one replica only shows as a mix of answers.
"""

from __future__ import annotations

import time

import pytest


pytestmark = pytest.mark.serve

NAME = "tiny-retriever"
REQUESTS = 40  # sequential requests after each write: the chance that all of them hit one replica is 2**-39


@pytest.fixture(scope="module")
def registry(tiny_run, tmp_path_factory):
    """A fresh MLflow store holding the tiny bundle as versions 1 and 2, champion -> 2."""
    import mlflow

    from towerline.training.tracking import promote, register_bundle

    root = tmp_path_factory.mktemp("replicas-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("replicas", artifact_location=(root / "artifacts").as_uri())
        run_id = mlflow.MlflowClient().create_run(experiment).info.run_id
        versions = [register_bundle(run_id, NAME, tiny_run.bundle_dir) for _ in range(2)]
        assert versions == ["1", "2"]
        promote(NAME, 2, "champion")
        yield uri
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def served(serve_base, registry, tmp_path_factory):
    import httpx
    from ray import serve

    from towerline.serving.app import AppArgs, build_app

    tmp = tmp_path_factory.mktemp("replicas-serve")
    try:
        args = AppArgs(model=f"models:/{NAME}@champion", tracking_uri=registry,
                       settings={"history_db": str(tmp / "history.sqlite"), "feedback_db": str(tmp / "feedback.sqlite"),
                                 "ingress_replicas": 2, "admin_poll_s": 0.25})
        serve.run(build_app(args), name="towerline", route_prefix="/")
        with httpx.Client(base_url=serve_base, timeout=60) as client:
            yield client
    finally:
        serve.delete("towerline")


def _versions(client) -> set[str]:
    return {client.post("/recommend", json={"user_id": "u000001", "k": 3}).json()["model_version"] for _ in range(REQUESTS)}


def _similar_statuses(client, item_id: str) -> set[int]:
    return {client.get(f"/items/{item_id}/similar", params={"k": 3}).status_code for _ in range(REQUESTS)}


def _replace_one_ingress_replica() -> None:
    """Kill one ingress replica's actor and wait until Serve runs two again."""
    import ray
    from ray import serve

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "towerline#Ingress#" in a["name"]]
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        names_now = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "towerline#Ingress#" in a["name"]]
        running = serve.status().applications["towerline"].deployments["Ingress"].replica_states.get("RUNNING", 0)
        if names[0] not in names_now and len(names_now) == 2 and running == 2:
            return
        time.sleep(0.5)
    pytest.fail("Serve did not replace the killed ingress replica in 90 s")


def _promote(registry: str, version: int) -> None:
    import mlflow

    from towerline.training.tracking import promote

    mlflow.set_tracking_uri(registry)
    try:
        promote(NAME, version, "champion")
    finally:
        mlflow.set_tracking_uri(None)


def test_rollback_cold_items_and_a_new_replica_reach_every_ingress_replica(served, registry, tiny_run):
    client = served
    assert _versions(client) == {"2"}

    _promote(registry, 1)  # roll back: the alias moves, the app is told once
    resp = client.post("/admin/reload")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["current"]["model_version"] == "1" and body["current"]["model_key"] == f"models:/{NAME}/1"
    assert body["replicas"] == {"replicas": 2, "applied": 2, "failed": 0}
    assert _versions(client) == {"1"}

    from test_admin_items import _best_user, _twin_rows  # the in-process cold-item tests' helpers

    from towerline.serving import recommender as rec

    local = rec.load_model(tiny_run.bundle_dir)  # the bundle both versions hold
    rows = [{k: v for k, v in r.items() if k != "_source"} for r in _twin_rows(local, 1)]
    user, rank = _best_user(rec.add_items(local, rows)[0], "cold-0")
    assert user is not None
    assert _similar_statuses(client, "cold-0") == {404}
    resp = client.post("/admin/items", json=rows)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["added"] == ["cold-0"] and body["item_count"] == local.n_items - 2 + 1
    assert body["replicas"] == {"replicas": 2, "applied": 2, "failed": 0}
    assert _similar_statuses(client, "cold-0") == {200}
    got = client.post("/recommend", json={"user_id": user, "k": min(rank + 11, 200)}).json()["items"]
    assert "cold-0" in [i["item_id"] for i in got]
    assert client.post("/admin/items", json=[{"attributes": ["x"]}]).status_code == 422

    _promote(registry, 2)  # a replica that read the alias now would serve 2; one that follows the app serves 1
    _replace_one_ingress_replica()
    assert _versions(client) == {"1"}
    assert _similar_statuses(client, "cold-0") == {200}
