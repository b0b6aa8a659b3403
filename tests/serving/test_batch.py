"""Batch recommendations are the service's answers: in process, through the CLI and over HTTP.

``recommend_all`` runs ``Recommender.recommend_async`` with the model stages gathered per chunk; the
checks compare it with one ``Recommender.recommend`` per user (any chunk size), with a real Serve app on
127.0.0.1 for 20 users (online events included, read from the app's own history file), and the CLI's
files and one-line errors.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pandas as pd
import pytest


K = 8


def _per_user(recommender, users, k=K) -> dict[str, list[tuple[str, float]]]:
    return {u: recommender.recommend(u, k).items for u in users}


def _as_lists(df: pd.DataFrame) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for u, g in df.sort_values(["user_id", "rank"]).groupby("user_id", sort=False):
        out[str(u)] = [(str(i), float(s)) for i, s in zip(g["item_id"], g["score"])]
    return out


def _users(state, n: int) -> list[str]:
    from towerline.serving.batch import known_users

    return known_users(state)[:n]


@pytest.fixture(scope="module")
def recommender(tiny_state):
    from towerline.serving.batch import NoOnlineHistory
    from towerline.serving.recommender import Recommender
    from towerline.serving.settings import ServeSettings

    return Recommender(tiny_state, ServeSettings(), NoOnlineHistory())


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (7, 2), (512, 1)])
def test_batch_equals_one_request_per_user(tiny_state, recommender, batch_size, workers):
    from towerline.serving.batch import COLUMNS, recommend_all

    users = _users(tiny_state, 60) + ["never-seen-user"]  # an unknown user: popular fallback, not an error
    df = recommend_all(tiny_state, users, k=K, batch_size=batch_size, workers=workers)  # chunks side by side: same rows, in order
    assert list(df.columns) == COLUMNS
    got, want = _as_lists(df), _per_user(recommender, users)
    assert set(got) == set(users) and list(dict.fromkeys(df["user_id"])) == users
    for u in users:
        assert [i for i, _ in got[u]] == [i for i, _ in want[u]], u
        np.testing.assert_allclose([s for _, s in got[u]], [s for _, s in want[u]], rtol=1e-6, atol=1e-6)
    assert df.groupby("user_id")["rank"].apply(lambda r: list(r) == list(range(1, K + 1))).all()
    assert df.loc[df.user_id == "never-seen-user", "fallback"].all()
    assert not df.loc[df.user_id == users[0], "fallback"].any()


def test_all_means_every_user_of_the_model_and_consent_is_kept(tiny_state, recommender):
    from towerline.serving.batch import recommend_all

    df = recommend_all(tiny_state, "all", k=3)
    assert df["user_id"].nunique() == len(tiny_state.bundle.vocabs.users.ids)
    if tiny_state.no_consent:  # users who said no get popular items, as /recommend gives them
        u = sorted(tiny_state.no_consent)[0]
        assert df.loc[df.user_id == u, "fallback"].all()
        assert _as_lists(df)[u] == recommender.recommend(u, 3).items


def test_cli_writes_parquet_and_csv_from_csv_txt_and_parquet_users(tiny_run, tiny_state, recommender, tmp_path):
    from towerline.cli import main

    users = _users(tiny_state, 12)
    pd.DataFrame({"user_id": users, "other": 1}).to_csv(tmp_path / "users.csv", index=False)
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    pd.DataFrame({"user_id": users}).to_parquet(tmp_path / "users.parquet")
    want = _per_user(recommender, users, 5)
    for src, out in (("users.csv", "recs.parquet"), ("users.txt", "recs.csv"), ("users.parquet", "r2.parquet")):
        rc = main(["recommend", "--model", str(tiny_run.bundle_dir), "--users", str(tmp_path / src), "--k", "5",
                   "--out", str(tmp_path / out), "--no-progress"])
        assert rc == 0
        df = pd.read_parquet(tmp_path / out) if out.endswith(".parquet") else pd.read_csv(tmp_path / out, dtype={"user_id": str, "item_id": str})
        assert list(df.columns) == ["user_id", "rank", "item_id", "score", "model_version", "fallback"]
        assert {u: [i for i, _ in v] for u, v in _as_lists(df).items()} == {u: [i for i, _ in v] for u, v in want.items()}


@pytest.mark.parametrize("case, mentions", [
    ("nocolumn", "no user_id column"), ("emptyrow", "row 2 has an empty user_id"),
    ("missing", "file not found"), ("suffix", "use a .parquet or .csv"),
])
def test_cli_errors_are_one_line_naming_the_flag(tiny_run, tmp_path, capsys, case, mentions):
    from towerline.cli import main

    users, out = tmp_path / "users.csv", tmp_path / "recs.parquet"
    if case == "nocolumn":
        users.write_text("id\nu1\n")
    elif case == "emptyrow":
        users.write_text("user_id\nu1\n\"\"\n")
    elif case == "missing":
        users = tmp_path / "nope.csv"
    else:
        users.write_text("user_id\nu1\n")
        out = tmp_path / "recs.json"
    rc = main(["recommend", "--model", str(tiny_run.bundle_dir), "--users", str(users), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and mentions in err and ("--users" in err or "--out" in err)
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.serve
def test_batch_export_equals_the_served_answers_over_http(serve_base, tiny_run, tmp_path_factory):
    """20 users through a real Serve app on 127.0.0.1, one of them with online events posted to the app,
    against the export that reads the app's history file (once the app is deleted)."""
    from ray import serve

    from towerline.serving.app import AppArgs, build_app
    from towerline.serving.batch import recommend_all
    from towerline.serving.history import SQLiteHistoryStore
    from towerline.serving.recommender import load_model
    from towerline.serving.settings import ServeSettings

    tmp = tmp_path_factory.mktemp("batch_http")
    settings = ServeSettings(history_db=str(tmp / "history.sqlite"), feedback_db=str(tmp / "feedback.sqlite"),
                             ingress_replicas=1)
    state = load_model(tiny_run.bundle_dir, settings)
    users = _users(state, 19) + ["brand-new-visitor"]
    items = [str(i) for i in state.bundle.vocabs.items.ids[:3]]
    try:
        serve.run(build_app(AppArgs(model=str(tiny_run.bundle_dir), settings=settings)), name="batch", route_prefix="/batch")
        with httpx.Client(base_url=f"{serve_base}/batch", timeout=60) as http:
            events = [{"user_id": u, "item_id": i, "event_type": "click", "timestamp": 1_900_000_000 + n}
                      for u in (users[0], users[-1]) for n, i in enumerate(items)]
            assert http.post("/events", json=events).status_code == 200
            served = {}
            for u in users:
                r = http.post("/recommend", json={"user_id": u, "k": K})
                assert r.status_code == 200, r.text
                served[u] = r.json()
    finally:
        serve.delete("batch")
    store = SQLiteHistoryStore(settings.history_db)
    try:
        df = recommend_all(state, users, k=K, settings=settings, store=store)
    finally:
        store.close()
    got = _as_lists(df)
    for u in users:
        body = served[u]
        assert [i for i, _ in got[u]] == [x["item_id"] for x in body["items"]], u
        np.testing.assert_allclose([s for _, s in got[u]], [x["score"] for x in body["items"]], rtol=1e-5, atol=1e-6)
        rows = df[df.user_id == u]
        assert rows["fallback"].eq(body["fallback"]).all()
        assert rows["model_version"].astype(object).where(rows["model_version"].notna(), None).eq(body["model_version"]).all() \
            or body["model_version"] is None
    assert served[users[-1]]["fallback"] is False  # a new visitor's clicks personalise both answers
    assert not any(i in items for i, _ in got[users[0]])  # the posted items count as seen in the export too


def test_batch_works_inside_a_running_event_loop(tiny_state, recommender):
    """A notebook kernel or an async server already runs a loop in this thread."""
    import asyncio

    from towerline.serving.batch import recommend_all

    users = _users(tiny_state, 5)

    async def inside() -> pd.DataFrame:
        return recommend_all(tiny_state, users, k=4)

    df = asyncio.run(inside())
    assert _as_lists(df) == _per_user(recommender, users, 4)


AB = {"name": "home-feed", "control": "control", "arms": [
    {"name": "control", "share": 0.4},  # the served model, default rules
    {"name": "challenger", "model": None, "share": 0.3},  # its own model version (the ranked run's bundle)
    {"name": "popular", "rules": "popular", "share": 0.3},  # the non-personalised arm
]}


def _ab(ranked_run) -> dict:
    arms = [dict(a, model=str(ranked_run.bundle_dir)) if a["name"] == "challenger" else a for a in AB["arms"]]
    return dict(AB, arms=arms)


def test_batch_rows_are_the_answers_of_each_users_arm(tiny_run, ranked_run, tmp_path):
    """An experiment with three arms (served model, an arm's own model with a ranker, popular rules):
    every exported user has exactly the /recommend answer of the ingress app (in process, no Ray) built
    from the same AppArgs, arm included."""
    from fastapi.testclient import TestClient

    from towerline.serving.app import AppArgs, IngressReplica
    from towerline.serving.batch import ARM_COLUMNS, COLUMNS, recommend_all
    from towerline.serving.recommender import LocalStages

    args = AppArgs(model=str(tiny_run.bundle_dir), tracking_uri=tiny_run.tracking_uri,
                   settings={"history_db": str(tmp_path / "history.sqlite"), "feedback_db": str(tmp_path / "feedback.sqlite")},
                   experiments=[_ab(ranked_run)], experiment="home-feed").resolved()
    replica = IngressReplica(args, stages=LocalStages(args.settings))
    try:
        users = _users(replica.state, 45) + ["never-seen-user"]
        with TestClient(replica.asgi_app()) as client:
            served = {u: client.post("/recommend", json={"user_id": u, "k": K}).json() for u in users}
    finally:
        replica.close()
    df = recommend_all(replica.state, users, k=K, settings=args.settings, experiments=args.experiments,
                       experiment=args.experiment, batch_size=16)
    assert list(df.columns) == COLUMNS + ARM_COLUMNS and df["experiment"].eq("home-feed").all()
    got = _as_lists(df)
    for u in users:
        body, rows = served[u], df[df.user_id == u]
        assert [i for i, _ in got[u]] == [x["item_id"] for x in body["items"]], u
        np.testing.assert_allclose([s for _, s in got[u]], [x["score"] for x in body["items"]], rtol=1e-6, atol=1e-6)
        assert rows["arm"].eq(body["arm"]).all() and rows["fallback"].eq(body["fallback"]).all(), u
        assert rows["model_version"].astype(object).where(rows["model_version"].notna(), None).eq(body["model_version"]).all() \
            or body["model_version"] is None
    arms = {u: served[u]["arm"] for u in users}
    assert set(arms.values()) == {"control", "challenger", "popular"}  # 46 users reach every arm
    assert all(served[u]["fallback"] for u in users if arms[u] == "popular")
    challenger = [u for u in users[:-1] if arms[u] == "challenger"]
    control = recommend_all(replica.state, challenger, k=K, settings=args.settings)  # the served model, no split
    assert _as_lists(control) != {u: got[u] for u in challenger}  # the arm's own model answered them


def test_cli_experiment_adds_the_arm_columns_and_checks_its_flags(tiny_run, ranked_run, tiny_state, tmp_path, capsys):
    import yaml

    from towerline.cli import main
    from towerline.config import ExperimentConfig, from_dict
    from towerline.marketing.assignment import assign_arms

    (tmp_path / "ab.yaml").write_text(yaml.safe_dump({"experiments": [_ab(ranked_run)]}))
    users = _users(tiny_state, 20)
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    out = tmp_path / "recs.csv"
    base = ["recommend", "--model", str(tiny_run.bundle_dir), "--users", str(tmp_path / "users.txt"), "--k", "3",
            "--out", str(out), "--no-progress"]
    assert main(base + ["--config", str(tmp_path / "ab.yaml"), "--experiment", "home-feed"]) == 0
    df = pd.read_csv(out, dtype=str)
    assert list(df.columns)[-2:] == ["experiment", "arm"]
    want = dict(zip(users, assign_arms(from_dict(ExperimentConfig, _ab(ranked_run), "experiments"), users)))
    assert df.groupby("user_id")["arm"].first().to_dict() == want
    assert "experiment home-feed:" in capsys.readouterr().out
    out.unlink()
    for extra, mentions in ((["--experiment", "home-feed"], "--experiment home-feed"),
                            (["--config", str(tmp_path / "ab.yaml"), "--experiment", "nope"], "nope")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert mentions in err and len(err.splitlines()) == 1 and not out.exists()
