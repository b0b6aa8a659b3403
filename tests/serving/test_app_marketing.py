"""The marketing side of the real Serve app: A/B arms, profiles, segments, audiences, feedback.

An application of its own ("/ab") is deployed into the run's Serve instance (``serve_base``), with
an experiment and a profiles table, so the plain app's tests keep their no-experiment contract. It
keeps its online history in a real redis-server, as a deployment on several machines does.
"""

from __future__ import annotations

import httpx
import pytest

from test_app import assert_problem
from test_campaign_triggers import campaign_settings, wait_for

pytestmark = pytest.mark.serve

EXPERIMENT = {
    "name": "home-feed",
    "control": "control",
    "arms": [{"name": "control", "share": 0.5}, {"name": "popular", "rules": "popular", "share": 0.5}],
}


@pytest.fixture(scope="module")
def ab(serve_base, tiny_run, tmp_path_factory, redis_url):
    from ray import serve

    from towerline.config import ProfileConfig
    from towerline.features.user_features import build_profiles
    from towerline.marketing.profiles import export_profiles
    from towerline.features.synthetic import generate_dataset
    from towerline.serving.app import AppArgs, build_app

    base = serve_base
    tmp = tmp_path_factory.mktemp("ab")
    profiles = build_profiles(generate_dataset(300, 60, seed=0), ProfileConfig())  # the tiny run's data
    export_profiles(profiles, tmp / "profiles.parquet")
    args = AppArgs(
        model=str(tiny_run.bundle_dir),
        # this app also covers the other placement: every request hops to the Retriever deployment
        # and the history store for several machines: Redis instead of the SQLite file
        settings={"history_redis_url": redis_url, "feedback_db": str(tmp / "f.sqlite"), "stage_placement": "deployments",
                  **campaign_settings(tmp)},  # and a signup campaign fired from /events into tmp/outbox
        experiments=[EXPERIMENT],
        experiment="home-feed",
        profiles=str(tmp / "profiles.parquet"),
    )
    serve.run(build_app(args), name="ab", route_prefix="/ab")
    with httpx.Client(base_url=f"{base}/ab", timeout=60) as client:
        yield client, tiny_run, profiles, tmp
    serve.delete("ab")


def test_recommend_carries_a_stable_arm_and_the_popular_arm_is_not_personalised(ab):
    client, tiny_run, *_ = ab
    from towerline.training.bundle import load_bundle

    b = load_bundle(tiny_run.bundle_dir)
    users = [str(u) for u in b.vocabs.users.decode(b.histories.user_idx[b.histories.lengths >= 3][:30])]
    arms = {}
    for u in users:
        first = client.post("/recommend", json={"user_id": u, "k": 3}).json()
        again = client.post("/recommend", json={"user_id": u, "k": 3}).json()
        assert first["arm"] == again["arm"]
        arms[u] = first
    assert {r["arm"] for r in arms.values()} == {"control", "popular"}
    assert all(r["fallback"] for r in arms.values() if r["arm"] == "popular")
    assert not any(r["fallback"] for r in arms.values() if r["arm"] == "control")


def test_profile_of_a_consenting_user_and_404_for_unknown(ab):
    client, _, profiles, _ = ab
    user = str(profiles.loc[profiles["consent"].astype(bool), "user_id"].iloc[0])
    body = client.get(f"/users/{user}/profile").json()
    assert body["user_id"] == user and body["segment"] in {"new", "active", "loyal", "at-risk", "churned"}
    assert_problem(client.get("/users/nobody-at-all/profile"), 404, "nobody-at-all")
    hidden = profiles.loc[~profiles["consent"].astype(bool), "user_id"]
    if len(hidden):
        assert client.get(f"/users/{hidden.iloc[0]}/profile").status_code == 404


def test_segments_have_sizes_and_definitions(ab):
    body = ab[0].get("/segments").json()
    assert body["definitions"] and body["segments"]


def test_audience_for_an_item_and_problems_for_bad_queries(ab):
    client = ab[0]
    body = client.post("/audiences", json={"item_id": "i00003", "size": 20}).json()
    assert 0 < body["size"] <= 20 and len({u["user_id"] for u in body["users"]}) == body["size"]
    scores = [u["score"] for u in body["users"]]
    assert scores == sorted(scores, reverse=True)
    assert_problem(client.post("/audiences", json={"item_id": "no-such-item", "size": 5}), 404, "no-such-item")
    assert_problem(client.post("/audiences", json={"item_id": "i00003", "attributes": ["x"], "size": 5}), 422)
    assert_problem(client.post("/audiences", json={"item_id": "i00003", "size": 0}), 422, "size")


def test_feedback_is_idempotent_and_unknown_experiments_are_rejected(ab):
    client = ab[0]
    events = [
        {"experiment": "home-feed", "user_id": "u1", "item_id": "i00001", "kind": "impression", "event_id": "f-1"},
        {"experiment": "home-feed", "user_id": "u1", "item_id": "i00001", "kind": "click", "event_id": "f-2"},
        {"experiment": "no-such-experiment", "user_id": "u1", "kind": "click", "event_id": "f-3"},
        {"experiment": "home-feed", "user_id": "u1", "kind": "teleport"},
    ]
    body = client.post("/feedback", json=events).json()
    assert (body["accepted"], body["duplicate"]) == (2, 0)
    assert any("kind" in r for r in body["rejected"]) and any("no-such-experiment" in r for r in body["rejected"])
    again = client.post("/feedback", json=events[:2]).json()
    assert (again["accepted"], again["duplicate"]) == (0, 2)


def test_events_go_to_redis_and_shape_the_next_recommendation(ab, redis_url):
    from towerline.serving.redis_history import RedisHistoryStore

    from towerline.config import ArmConfig, ExperimentConfig
    from towerline.marketing.assignment import assign_arm
    client = ab[0]
    experiment = ExperimentConfig("home-feed", tuple(ArmConfig(a["name"], share=a["share"]) for a in EXPERIMENT["arms"]))
    # a newcomer (unknown to the model) whom the stable hash puts in the personalised arm
    user = next(u for u in (f"redis-newcomer-{n}" for n in range(100)) if assign_arm(experiment, u) == "control")
    first = client.post("/recommend", json={"user_id": user, "k": 5}).json()
    assert first["fallback"] is True
    events = [{"user_id": user, "item_id": f"i{n:05d}", "event_type": "view", "timestamp": 1_900_000_000 + n,
               "event_id": f"redis-{n}"} for n in (3, 7, 11)]
    body = client.post("/events", json=events).json()
    assert (body["accepted"], body["duplicate"], body["rejected"], body["rejected_count"]) == (3, 0, [], 0)
    assert client.post("/events", json=events[:1]).json()["duplicate"] == 1
    stored = RedisHistoryStore(redis_url).recent(user, 10)  # another machine reading the same Redis
    assert [e.item_id for e in stored] == ["i00003", "i00007", "i00011"]
    after = client.post("/recommend", json={"user_id": user, "k": 5}).json()
    assert (after["arm"], after["fallback"]) == ("control", False)
    assert not {"i00003", "i00007", "i00011"} & {i["item_id"] for i in after["items"]}  # seen items dropped


def test_a_signup_posted_to_events_reaches_the_outbox_within_a_second_once(ab):
    """The real app (two ingress replicas, content through the Retriever deployment's path): the
    signup's message is in the Parquet outbox within 1 s, and re-posts, whichever replica they
    reach, add nothing."""
    import time

    from towerline.marketing.outbox import ParquetOutbox

    client, _, _, tmp = ab
    outbox = ParquetOutbox(tmp / "outbox")
    signup = {"user_id": "new-1", "item_id": "-", "event_type": "signup", "event_id": "serve-signup-1"}
    t0 = time.monotonic()
    assert client.post("/events", json=[signup, {**signup, "user_id": "shy", "event_id": "serve-signup-2"}]).status_code == 200
    got = wait_for(outbox, 1)
    assert time.monotonic() - t0 < 1.0 and got["user_id"].tolist() == ["new-1"], got
    assert got["campaign"].tolist() == ["welcome-now"] and len(got["items"].iloc[0]) == 3
    for n in range(4):  # re-posts, new event ids too: the message id is the same, so nothing more
        assert client.post("/events", json=[{**signup, "event_id": f"serve-signup-again-{n}"}]).status_code == 200
    time.sleep(0.5)
    assert outbox.history()["message_id"].tolist() == got["message_id"].tolist()
