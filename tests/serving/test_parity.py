"""What is evaluated offline is what is served: a real Serve app over HTTP against ``training.inference``.

A tiny bundle *with* a trained ranker is served on 127.0.0.1 with the business rules set to what
evaluation does (history masked; no category cap, stock or block filter). For 200 users the served
top-10 must equal the offline pipeline's top-10 item for item; a user must get the same answer alone
and inside 32 concurrent requests; and the ``"deployments"`` placement must answer exactly as the
default in-ingress placement does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest


pytestmark = pytest.mark.serve

N_USERS = 200


@pytest.fixture(scope="module")
def apps(serve_base, ranked_run, tmp_path_factory):
    """(base URL of the default app, base URL of the deployments app, settings); both deleted after."""
    from ray import serve

    from towerline.serving.app import AppArgs, build_app
    from towerline.serving.offline import evaluation_settings

    tmp = tmp_path_factory.mktemp("parity")
    settings = evaluation_settings(history_db=str(tmp / "history.sqlite"), feedback_db=str(tmp / "feedback.sqlite"))
    # 32 concurrent requests must all be answered here (parity, not load shedding): room for all of them
    settings = settings.model_copy(update={"max_ongoing_requests": 64, "max_queued_requests": -1,
                                          "ingress_replicas": 1})  # parity needs one replica, not two
    try:
        args = AppArgs(model=str(ranked_run.bundle_dir), settings=settings)
        serve.run(build_app(args), name="parity", route_prefix="/parity-ingress")
        split = args.model_copy(update={"settings": settings.model_copy(update={"stage_placement": "deployments"})})
        serve.run(build_app(split), name="parity-deployments", route_prefix="/parity-deployments")
        yield f"{serve_base}/parity-ingress", f"{serve_base}/parity-deployments", settings
    finally:
        for name in ("parity", "parity-deployments"):
            serve.delete(name)


@pytest.fixture(scope="module")
def offline(apps, ranked_run):
    """(user ids, offline top-10 item ids) of N_USERS users with consent and a history."""
    from towerline.serving import recommender as rec
    from towerline.serving.offline import offline_top_k

    state = rec.load_model(str(ranked_run.bundle_dir), apps[2])
    b = state.bundle
    users = b.vocabs.users.decode(b.histories.user_idx).astype(str)
    rows = [r for r in np.flatnonzero(b.histories.lengths >= 1) if users[r] not in state.no_consent][:N_USERS]
    assert len(rows) == N_USERS
    tops = offline_top_k(state, rec.training_histories(b, np.asarray(rows)), 10)
    return [users[r] for r in rows], [b.vocabs.items.decode(t).astype(str).tolist() for t in tops]


def recommend(client: httpx.Client, user: str) -> list[tuple[str, float]]:
    resp = client.post("/recommend", json={"user_id": user, "k": 10})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["fallback"] is False
    return [(i["item_id"], i["score"]) for i in body["items"]]


def test_served_top10_equals_the_offline_pipeline_item_for_item(apps, offline):
    users, tops = offline
    with httpx.Client(base_url=apps[0], timeout=60) as client:
        served = [[i for i, _ in recommend(client, u)] for u in users]
    assert all(len(t) == 10 for t in tops)
    mismatched = [u for u, s, t in zip(users, served, tops) if s != t]
    assert not mismatched, f"{len(mismatched)} of {len(users)} users served another top-10 than offline: {mismatched[:5]}"


def test_a_user_gets_the_same_answer_alone_and_among_32_concurrent_requests(apps, offline):
    users = offline[0][:64]
    with httpx.Client(base_url=apps[0], timeout=60) as client:
        alone = {u: recommend(client, u) for u in users}
    with ThreadPoolExecutor(32) as pool, httpx.Client(base_url=apps[0], timeout=60,
                                                       limits=httpx.Limits(max_connections=32)) as client:
        together = list(pool.map(lambda u: (u, recommend(client, u)), users * 2))  # 128 requests, 32 at a time
    changed = [u for u, got in together if got != alone[u]]  # items and scores, exactly
    assert not changed, f"{len(set(changed))} users got another answer among concurrent requests"


def test_deployment_placement_answers_exactly_as_the_ingress_placement(apps, offline):
    from ray import serve

    users = offline[0][:40]
    with httpx.Client(base_url=apps[0], timeout=60) as a, httpx.Client(base_url=apps[1], timeout=60) as b:
        assert [recommend(a, u) for u in users] == [recommend(b, u) for u in users]
    apps_status = serve.status().applications
    # stages in the ingress: no model deployment bound (AdminState holds what admin writes decided)
    assert set(apps_status["parity"].deployments) == {"Ingress", "AdminState"}
    assert set(apps_status["parity-deployments"].deployments) == {"Ingress", "AdminState", "Retriever", "Ranker"}
