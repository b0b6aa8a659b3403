"""LTV: the regressor beats "next period = last period" on a simulated shop; the BTYD inputs are right."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from towerline.features.contracts import Dataset
from towerline.marketing.ltv import LtvConfig, add_predicted_ltv, btyd_summary, evaluate_ltv, train_ltv, value_errors
from towerline.marketing.model_inputs import DAY, profiles_at
from towerline.marketing.profiles import profile_of
from towerline.marketing.simulator import simulate_shop

FAST = LtvConfig(max_iter=80)
T0 = 1_750_000_000 // DAY * DAY  # midnight, epoch seconds


@pytest.fixture(scope="module")
def shop():
    return simulate_shop(3000, 300, seed=6)


def test_value_errors_on_a_hand_case():
    e = value_errors(np.array([0.0, 10, 20, 30]), np.array([1.0, 2, 3, 4]))
    assert e["spearman"] == pytest.approx(1.0)
    assert e["mae"] == pytest.approx((1 + 8 + 17 + 26) / 4)
    assert value_errors(np.array([0.0, 1.0]), np.array([5.0, 5.0]))["spearman"] == 0.0  # constant forecast


def test_ltv_model_beats_last_period_on_the_next_period(shop):
    r = evaluate_ltv(shop.dataset, FAST)
    assert r["customers"] > 500 and r["mean_revenue"] > 0
    assert r["model"]["spearman"] > r["last_period"]["spearman"] + 0.05, r
    assert r["model"]["mae"] < r["last_period"]["mae"], r


def test_predicted_ltv_is_non_negative_and_shown_in_the_profile(shop):
    model = train_ltv(shop.dataset, cfg=FAST)
    profiles = add_predicted_ltv(profiles_at(shop.dataset, model.trained_at), model, shop.dataset)
    customers = profiles["frequency"] >= 1
    assert (profiles.loc[customers, "predicted_ltv"] >= 0).all()
    assert profiles.loc[~customers, "predicted_ltv"].isna().all()
    user = profiles.loc[customers & profiles["consent"], "user_id"].iloc[0]
    assert profile_of(profiles, user).predicted_ltv == pytest.approx(
        float(profiles.loc[profiles["user_id"] == user, "predicted_ltv"].iloc[0]))


def test_btyd_summary_folds_purchases_per_day_as_fader_et_al_do():
    rows = [  # (user, day, second, value)
        ("a", 0, 100, 10.0), ("a", 0, 200, 5.0), ("a", 3, 0, 20.0), ("a", 9, 0, 40.0),  # 3 purchase days
        ("b", 5, 0, 7.0),  # one purchase: no repeats
    ]
    events = pd.DataFrame({
        "user_id": [r[0] for r in rows], "item_id": "i1", "timestamp": [T0 + r[1] * DAY + r[2] for r in rows],
        "event_type": "purchase", "value": [r[3] for r in rows], "event_id": None, "channel": None,
    })
    ds = Dataset("hand", events, pd.DataFrame({"item_id": ["i1"]}), pd.DataFrame({"user_id": ["a", "b"]}))
    s = btyd_summary(ds, T0 + 10 * DAY, ["a", "b"]).set_index("customer_id")
    assert s.loc["a"].tolist() == [2.0, 9.0, 10.0, 30.0]  # frequency, recency, T, mean repeat value
    assert s.loc["b"].tolist() == [0.0, 0.0, 5.0, 0.0]


@pytest.mark.slow
def test_btyd_reference_forecasts_more_for_frequent_recent_buyers(shop):
    pytest.importorskip("pymc_marketing")
    from towerline.marketing.ltv import predict_btyd

    at = int(shop.dataset.events["timestamp"].max()) - 30 * DAY
    prof = profiles_at(shop.dataset, at)
    ids = prof.loc[prof["frequency"] >= 1, "user_id"]
    pred = predict_btyd(shop.dataset, at, ids, 30.0)
    assert (pred >= 0).all() and len(pred) == len(ids)
    summary = btyd_summary(shop.dataset, at, ids).set_index("customer_id")
    busy = (summary["frequency"] >= 3) & (summary["T"] - summary["recency"] < 14)
    assert pred[busy.to_numpy()].mean() > pred[~busy.to_numpy()].mean()
