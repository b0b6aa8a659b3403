"""Churn warning: beats recency and RFM on a simulated shop, no future in its features, shown in profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from towerline.errors import DataValidationError
from towerline.features.contracts import Dataset
from towerline.marketing import churn as churn_module
from towerline.marketing.churn import (
    ChurnConfig,
    add_churn_probability,
    churn_examples,
    evaluate_churn,
    precision_at,
    train_churn,
)
from towerline.marketing.model_inputs import DAY, profiles_at
from towerline.marketing.profiles import export_profiles, load_profiles, profile_of
from towerline.marketing.simulator import simulate_shop

FAST = ChurnConfig(max_iter=80)


@pytest.fixture(scope="module")
def shop():
    return simulate_shop(3000, 300, seed=5)


def test_precision_at_counts_positives_in_the_top_share():
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], bool)
    score = np.arange(10, 0, -1)  # first rows score highest
    assert precision_at(labels, score, 0.2) == 0.5
    assert precision_at(labels, score, 0.1) == 1.0


def test_churn_model_beats_recency_and_rfm_on_the_next_period(shop):
    result = evaluate_churn(shop.dataset, FAST)
    auc, p10 = result["auc"], result["precision_at_10"]
    assert 0.2 < result["churn_rate"] < 0.95 and result["customers"] > 500
    assert auc["model"] > auc["recency"] + 0.02, auc
    assert auc["model"] > auc["rfm"] + 0.02, auc
    assert p10["model"] >= p10["recency"], p10


def test_features_at_a_snapshot_ignore_later_events(shop):
    ds = shop.dataset
    at = int(ds.events["timestamp"].max()) - 40 * DAY
    X, y, _ = churn_examples(ds, at, FAST)
    ev = ds.events
    later = ev["timestamp"] > at
    cut = Dataset(ds.name, ev[~later].copy(), ds.items, ds.users)
    X_cut, _, _ = churn_examples(cut, at, FAST)
    pd.testing.assert_frame_equal(X, X_cut)
    assert y.mean() < 1  # but the labels do read the later events ...
    assert churn_examples(cut, at, FAST)[1].all()  # ... which the cut log lacks


def test_churn_probability_reaches_the_profile_and_survives_export(shop, tmp_path):
    model = train_churn(shop.dataset, cfg=FAST)
    profiles = add_churn_probability(profiles_at(shop.dataset, model.trained_at), model, shop.dataset)
    prob = profiles["churn_probability"]
    customers = profiles["frequency"] >= 1
    assert prob[customers].between(0, 1).all() and prob[~customers].isna().all()
    loaded = load_profiles(export_profiles(profiles, tmp_path / "p.parquet"))
    user = loaded.loc[loaded["frequency"] >= 1, "user_id"].iloc[0]
    shown = profile_of(loaded, user)
    assert shown is not None and shown.churn_probability == pytest.approx(float(prob[profiles["user_id"] == user].iloc[0]))
    assert shown.predicted_ltv is None  # no LTV column written
    never = loaded.loc[loaded["frequency"] == 0, "user_id"]
    if len(never):
        assert profile_of(loaded, never.iloc[0]).churn_probability is None


def test_get_profile_shows_the_churn_probability(shop, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from towerline.marketing.routes import MarketingService, marketing_router

    model = train_churn(shop.dataset, cfg=FAST)
    profiles = add_churn_probability(profiles_at(shop.dataset, model.trained_at), model, shop.dataset)
    path = export_profiles(profiles, tmp_path / "p.parquet")
    app = FastAPI()
    app.include_router(marketing_router(MarketingService([], None, tmp_path / "feedback.sqlite", path), lambda: None))
    user = profiles.loc[(profiles["frequency"] >= 1) & profiles["consent"], "user_id"].iloc[0]
    body = TestClient(app).get(f"/users/{user}/profile").json()
    assert body["churn_probability"] == pytest.approx(float(profiles.loc[profiles["user_id"] == user, "churn_probability"].iloc[0]))
    assert body["predicted_ltv"] is None


def test_bundle_vectors_become_features(shop, monkeypatch):
    ids = shop.profiles["user_id"].to_numpy()
    vecs = np.random.default_rng(0).normal(size=(len(ids), 4)).astype(np.float32)
    calls = []
    monkeypatch.setattr(churn_module, "bundle_user_vectors", lambda bundle: calls.append(bundle) or (ids, vecs))
    model = train_churn(shop.dataset, cfg=ChurnConfig(max_iter=10, train_snapshots=1), bundle="fake-bundle")
    assert calls == ["fake-bundle"]
    assert [c for c in model.feature_names if c.startswith("vec_")] == ["vec_0", "vec_1", "vec_2", "vec_3"]
    X, _, _ = churn_examples(shop.dataset, model.trained_at, model.cfg)  # scored without the vectors
    with pytest.raises(DataValidationError, match="same bundle"):
        model.predict(X)


def test_a_log_shorter_than_the_horizon_is_an_error_that_says_so(shop):
    with pytest.raises(DataValidationError, match="horizon"):
        train_churn(shop.dataset, cfg=ChurnConfig(horizon_days=400))


@pytest.mark.slow
def test_a_real_bundles_user_vectors_feed_the_churn_model(tiny_run):
    """The tiny run's bundle (trained on generate_dataset(300, 60, seed=0)) gives every user a vector."""
    from towerline.bundle import load_bundle
    from towerline.features.synthetic import generate_dataset

    bundle = load_bundle(tiny_run.bundle_dir)
    ds = generate_dataset(300, 60, seed=0)
    cfg = ChurnConfig(horizon_days=60, train_snapshots=1, max_iter=20, min_samples_leaf=5)
    model = train_churn(ds, cfg=cfg, bundle=bundle)
    assert sum(c.startswith("vec_") for c in model.feature_names) == bundle.dim
    profiles = add_churn_probability(profiles_at(ds, model.trained_at), model, ds, bundle=bundle)
    assert profiles.loc[profiles["frequency"] >= 1, "churn_probability"].between(0, 1).all()
