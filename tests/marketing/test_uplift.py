"""Uplift: Qini on hand-made cases, budgeted selection, and recovery of the simulator's true effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from towerline.errors import ConfigError, DataValidationError
from towerline.marketing.model_inputs import feature_frame
from towerline.marketing.simulator import incremental_conversions, run_campaign, simulate_shop
from towerline.marketing.uplift import (
    UpliftConfig,
    arm_outcomes,
    fit_response,
    fit_uplift,
    qini_coefficient,
    qini_curve,
    select_by_uplift,
)


def four_groups(n_per: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Persuadables, sure things, lost causes and sleeping dogs, each half treated.

    Returns (converted, treated, true effect): a persuadable converts only when treated, a sleeping
    dog only when not, sure things always, lost causes never.
    """
    effect = np.repeat([1.0, 0.0, 0.0, -1.0], 2 * n_per)
    base = np.repeat([0.0, 1.0, 0.0, 1.0], 2 * n_per)
    treated = np.tile(np.r_[np.ones(n_per, bool), np.zeros(n_per, bool)], 4)
    converted = np.where(treated, base + effect, base)
    return converted, treated, effect


def test_qini_of_a_perfect_ranking_is_positive_random_about_zero_reversed_negative():
    y, t, effect = four_groups()
    perfect = qini_coefficient(y, t, effect)
    rng = np.random.default_rng(0)
    random = [qini_coefficient(y, t, rng.random(len(y))) for _ in range(200)]
    # the curve climbs to 1/8 within the first quarter (persuadables), stays, and falls back to 0
    # within the last (sleeping dogs): its area lies between 1/8 * 3/4 and 1/8
    assert 0.125 * 0.75 <= perfect <= 0.125
    assert abs(np.mean(random)) < 0.005 and np.std(random) < perfect / 5
    assert qini_coefficient(y, t, -effect) < -0.125 * 0.75


def test_qini_curve_starts_at_zero_and_ends_at_the_overall_incremental_conversions():
    y, t, effect = four_groups(50)
    x, q = qini_curve(y, t, effect)
    assert x[0] == q[0] == 0 and x[-1] == 1
    overall = y[t].sum() - y[~t].sum() * t.sum() / (~t).sum()
    assert q[-1] == pytest.approx(overall / len(y))
    # the perfect ranking gains one conversion per treated persuadable first
    assert q[1:101].max() == pytest.approx(50 / len(y), rel=0.05)


def test_select_by_uplift_spends_the_budget_on_the_largest_positive_effects():
    s = pd.Series([0.1, -0.2, 0.5, 0.0, 0.3], index=["a", "b", "c", "d", "e"])
    assert select_by_uplift(s, 2).tolist() == ["c", "e"]
    assert select_by_uplift(s, 10).tolist() == ["c", "e", "a"]  # never a non-positive effect
    assert select_by_uplift(s, 10, only_positive=False).tolist() == ["c", "e", "a", "d", "b"]
    assert select_by_uplift(s.to_numpy(), 1).tolist() == [2]
    assert select_by_uplift(s, 0).tolist() == []
    with pytest.raises(ConfigError):
        select_by_uplift(s, -1)


def test_fit_uplift_rejects_a_group_with_one_outcome():
    X = np.zeros((10, 2))
    with pytest.raises(DataValidationError, match="holdout group"):
        fit_uplift(X, np.r_[np.ones(5, bool), np.zeros(5, bool)], np.r_[0, 1, 0, 1, 0, np.zeros(5)])


@pytest.fixture(scope="module")
def shop():
    return simulate_shop(8000, 400, seed=11)


def randomised(shop, arm: tuple[str, str]):
    """A randomised campaign of one arm, half held out; 70 % of users to learn from, 30 % held out."""
    c = run_campaign(shop, arms=[arm], holdout=0.5, seed=2)
    X = feature_frame(shop.profiles, shop.dataset.users).loc[c["user_id"]]
    test = np.random.default_rng(0).random(len(c)) < 0.3
    truth = shop.effect_of(*arm)["effect"].reindex(c["user_id"]).to_numpy()
    return c, X, test, truth


@pytest.mark.parametrize("learner", ["x", "t"])
def test_uplift_model_recovers_the_sign_of_the_true_effects(shop, learner):
    # SMS with 10 % off: many clear persuadables and many clear sleeping dogs (seniors dislike SMS)
    c, X, test, truth = randomised(shop, ("sms", "discount_10"))
    t, y = (c["group"] == "treated").to_numpy(), c["converted"].to_numpy()
    model = fit_uplift(X[~test], t[~test], y[~test], UpliftConfig(learner=learner, max_iter=100))
    pred = model.predict(X[test])
    truth = truth[test]
    persuadable, sleeping_dog = truth > 0.05, truth < -0.05  # users the offer clearly moves
    clear = persuadable | sleeping_dog
    assert sleeping_dog.sum() >= 100 and persuadable.sum() >= 300
    assert np.mean(np.sign(pred[clear]) == np.sign(truth[clear])) > 0.75
    assert (pred[persuadable] > 0).mean() > 0.75 and (pred[sleeping_dog] < 0).mean() > 0.65
    assert pred[sleeping_dog].mean() < 0 < pred[persuadable].mean()
    assert qini_coefficient(y[test], t[test], pred) > 0


def test_uplift_targeting_beats_response_targeting_and_random_at_the_same_budget(shop):
    c, X, test, truth = randomised(shop, ("email", "discount_10"))
    t, y = (c["group"] == "treated").to_numpy(), c["converted"].to_numpy()
    ids = c["user_id"].to_numpy()[test]
    budget = int(0.1 * test.sum())
    uplift = fit_uplift(X[~test], t[~test], y[~test], UpliftConfig(max_iter=100)).predict(X[test])
    chosen = select_by_uplift(pd.Series(uplift, index=ids), budget)
    response = fit_response(X[~test & t], y[~test & t], UpliftConfig(max_iter=100)).predict_proba(X[test].to_numpy())[:, 1]
    by_response = ids[np.argsort(-response, kind="stable")[:budget]]
    gain = incremental_conversions(shop, chosen, "email", "discount_10")
    assert len(chosen) <= budget
    assert gain >= 1.3 * incremental_conversions(shop, by_response, "email", "discount_10")
    assert gain >= 2.0 * truth[test].mean() * budget  # random targeting's expected gain


def test_revenue_uplift_targets_the_users_whose_offer_earns_the_most(shop):
    """The X-learner on revenue (Poisson outcome models): the budget goes to users whose true
    expected revenue gain, m * (p_treated * (1 - discount) - p_control), is large."""
    c, X, test, _ = randomised(shop, ("sms", "discount_10"))
    t, revenue = (c["group"] == "treated").to_numpy(), c["revenue"].to_numpy(dtype=np.float64)
    model = fit_uplift(X[~test], t[~test], revenue[~test], UpliftConfig(max_iter=50), outcome="revenue")
    assert model.outcome == "revenue"
    ids = c["user_id"].to_numpy()[test]
    eff = shop.effect_of("sms", "discount_10").reindex(ids)
    truth = shop.order_value.reindex(ids).to_numpy() * (eff["p_treated"] * 0.9 - eff["p_control"]).to_numpy()
    pred = model.predict(X[test])
    budget = int(0.1 * test.sum())
    chosen = np.argsort(-pred, kind="stable")[:budget]
    assert truth[chosen].sum() >= 2.0 * truth.mean() * budget  # random targeting's expected gain
    assert pd.Series(pred).corr(pd.Series(truth), method="spearman") > 0.2
    with pytest.raises(DataValidationError, match=">= 0"):
        fit_uplift(X[~test], t[~test], -revenue[~test], outcome="revenue")


def test_arm_outcomes_keeps_the_holdout_and_the_users_sent_that_arm():
    shop = simulate_shop(600, 100, seed=1)
    c = run_campaign(shop, arms=[("email", "reminder"), ("sms", "discount_20")], holdout=0.3, seed=0)
    rows, treated, converted = arm_outcomes(c, "sms", "discount_20")
    assert set(rows.loc[treated, "offer"]) == {"discount_20"} and set(rows.loc[~treated, "group"]) == {"holdout"}
    assert len(rows) == (c["group"] == "holdout").sum() + (c["offer"] == "discount_20").sum()
    assert converted.tolist() == rows["converted"].tolist()
    with pytest.raises(DataValidationError, match="push"):
        arm_outcomes(c, "push", "reminder")
