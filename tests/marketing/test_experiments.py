"""A/B experiments: stable assignment, idempotent feedback, and intervals that cover known effects."""

from __future__ import annotations

import numpy as np
import pytest
from towerline.config import ArmConfig, ExperimentConfig
from towerline.errors import ConfigError, DataValidationError
from towerline.marketing.assignment import assign_arm, assign_arms, find_experiment
from towerline.marketing.experiment_report import (
    experiment_report,
    format_report,
    write_report,
)
from towerline.marketing.feedback import Feedback, FeedbackStore, record_feedback
from towerline.marketing.simulation import simulate
from towerline.marketing.statistics import ratio_interval, wilson_interval

TWO = ExperimentConfig("home-feed", (ArmConfig("control", share=0.5), ArmConfig("treatment", share=0.5)))
THREE = ExperimentConfig("three", (ArmConfig("control", share=0.2), ArmConfig("b", share=0.3), ArmConfig("c", share=0.5)))


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


def test_same_user_gets_the_same_arm_every_time():
    users = [f"u{i}" for i in range(500)]
    first = assign_arms(THREE, users)
    rebuilt = ExperimentConfig("three", (ArmConfig("control", share=0.2), ArmConfig("b", share=0.3), ArmConfig("c", share=0.5)))
    assert assign_arms(rebuilt, users) == first
    assert [assign_arm(THREE, u) for u in users[:50]] == first[:50]


def test_shares_are_met_within_tolerance_on_10k_users():
    arms = np.array(assign_arms(THREE, [f"user-{i}" for i in range(10_000)]))
    for arm, share in (("control", 0.2), ("b", 0.3), ("c", 0.5)):
        # binomial sd at n=10k is at most 0.005; 0.02 is four of them
        assert abs((arms == arm).mean() - share) < 0.02, arm


def test_different_experiments_split_users_independently():
    users = [f"user-{i}" for i in range(4000)]
    other = ExperimentConfig("other", TWO.arms)
    same = np.mean(np.array(assign_arms(TWO, users)) == np.array(assign_arms(other, users)))
    assert 0.45 < same < 0.55


def test_feedback_is_idempotent_on_event_id(store):
    e = Feedback(experiment="home-feed", arm="control", user_id="u1", kind="click", event_id="ev-1", timestamp=10)
    assert store.record([e]).accepted == 1
    again = store.record([e, e])
    assert (again.accepted, again.duplicate) == (0, 2)
    conflict = store.record([e.model_copy(update={"kind": "purchase", "value": 3.0})])
    assert conflict.accepted == 0 and "already used" in conflict.rejected[0]
    no_id = Feedback(experiment="home-feed", arm="control", user_id="u2", kind="impression", timestamp=11)
    assert store.record([no_id]).accepted == 1 and store.record([no_id]).duplicate == 1  # retried without id
    assert store.count("home-feed") == 2


def test_record_feedback_derives_arms_and_rejects_unknown_names(store):
    result = record_feedback(store, [
        Feedback(experiment="home-feed", user_id="u7", kind="impression", event_id="a"),
        Feedback(experiment="missing", user_id="u7", kind="impression", event_id="b"),
        Feedback(experiment="home-feed", arm="nope", user_id="u7", kind="impression", event_id="c"),
    ], [TWO])
    assert result.accepted == 1 and len(result.rejected) == 2
    assert store.per_user("home-feed")["arm"].tolist() == [assign_arm(TWO, "u7")]
    with pytest.raises(ConfigError, match="known experiments: home-feed"):
        find_experiment([TWO], "nope")


def test_simulation_is_idempotent(store):
    rates = {"control": (0.1, 0.05, 20.0), "treatment": (0.1, 0.05, 20.0)}
    n = simulate(store, TWO, 300, rates, seed=5)
    assert n > 300 and simulate(store, TWO, 300, rates, seed=5) == 0
    with pytest.raises(ConfigError, match="treatment"):
        simulate(store, TWO, 10, {"control": (0.1, 0.05, 20.0)})


def test_report_intervals_cover_a_known_simulated_effect(store, tmp_path):
    true = {"control": (0.05, 0.04, 50.0), "treatment": (0.08, 0.08, 50.0)}
    simulate(store, TWO, 8000, true, seed=3)
    report = experiment_report(store, TWO, n_boot=500, seed=0)
    for arm, (ctr, conv, value) in true.items():
        a = report["arms"][arm]
        assert a["users"] > 3500
        assert a["ctr"]["ci"][0] <= ctr <= a["ctr"]["ci"][1], arm
        assert a["conversion"]["ci"][0] <= conv <= a["conversion"]["ci"][1], arm
        assert a["revenue_per_user"]["ci"][0] <= conv * value <= a["revenue_per_user"]["ci"][1], arm
    lift = report["arms"]["treatment"]["lift"]
    assert "lift" not in report["arms"]["control"]
    for metric, true_lift in (("ctr", 0.6), ("conversion", 1.0), ("revenue_per_user", 1.0)):
        lo, hi = lift[metric]["relative"]["ci"]
        assert lo <= true_lift <= hi and lo > 0, metric  # covers the truth and detects the effect
    html_path, json_path = write_report(report, tmp_path / "out")
    assert "Lift over control" in html_path.read_text() and json_path.exists()
    assert "treatment" in format_report(report)


def test_no_effect_gives_lift_intervals_around_zero(store):
    same = {"control": (0.05, 0.05, 30.0), "treatment": (0.05, 0.05, 30.0)}
    simulate(store, TWO, 6000, same, seed=11)
    lift = experiment_report(store, TWO, n_boot=500)["arms"]["treatment"]["lift"]
    for metric in ("ctr", "conversion", "revenue_per_user"):
        lo, hi = lift[metric]["relative"]["ci"]
        assert lo < 0 < hi, metric


def test_wilson_interval_keeps_its_coverage_at_a_small_rate():
    rng = np.random.default_rng(0)
    n, p = 300, 0.02
    hits = [lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in rng.binomial(n, p, 2000))]
    assert 0.92 <= np.mean(hits) <= 0.98


def test_delta_method_ctr_interval_accounts_for_user_clustering():
    """Users differ in click propensity, so impressions are correlated within a user: the delta
    interval over users keeps ~95% coverage where a Wilson interval over impressions does not."""
    rng = np.random.default_rng(1)
    true_ctr, delta_hits, naive_hits = 0.1, [], []
    for _ in range(300):
        propensity = rng.beta(0.5, 4.5, 400)  # mean 0.1, very heterogeneous
        impressions = 1 + rng.poisson(9, 400)
        clicks = rng.binomial(impressions, propensity)
        _, lo, hi = ratio_interval(clicks, impressions)
        delta_hits.append(lo <= true_ctr <= hi)
        wlo, whi = wilson_interval(int(clicks.sum()), int(impressions.sum()))
        naive_hits.append(wlo <= true_ctr <= whi)
    assert np.mean(delta_hits) >= 0.9
    assert np.mean(naive_hits) < np.mean(delta_hits) - 0.1


def test_report_without_feedback_says_how_to_get_some(store):
    with pytest.raises(DataValidationError, match="simulate"):
        experiment_report(store, TWO)


# trust checks: sample ratio, verdict, simulated marker, coverage


def test_sample_ratio_mismatch_is_flagged_and_leads_the_verdict():
    from towerline.marketing.experiment_report import report_from_users
    from towerline.marketing.simulation import simulate_per_user

    users = simulate_per_user(TWO, 6000, {"control": (0.05, 0.05, 30.0), "treatment": (0.05, 0.05, 30.0)}, seed=2)
    ok = report_from_users(users, TWO, n_boot=200)
    assert not ok["sample_ratio"]["mismatch"] and ok["sample_ratio"]["p_value"] > 0.001
    lost = users.drop(users[users["arm"] == "treatment"].index[:400])  # a logging bug loses 400 treated users
    bad = report_from_users(lost, TWO, n_boot=200)
    assert bad["sample_ratio"]["mismatch"] and bad["sample_ratio"]["p_value"] < 0.001
    assert bad["verdict"][0].startswith("Sample-ratio mismatch") and "do not trust" in bad["verdict"][0]


def test_verdict_names_the_metric_that_moved_and_the_ones_that_did_not():
    from towerline.marketing.experiment_report import _metric, verdict

    def lift(v, lo, hi):
        return {"relative": _metric(v, lo, hi)}

    report = {"control": "control", "sample_ratio": {"mismatch": False}, "arms": {
        "control": {},
        "treatment": {"lift": {"ctr": lift(0.01, -0.02, 0.04), "conversion": lift(0.041, 0.012, 0.070),
                               "revenue_per_user": lift(0.02, -0.03, 0.07)}},
        "b": {"lift": {"ctr": lift(-0.05, -0.08, -0.02), "conversion": lift(0.0, -0.1, 0.1),
                       "revenue_per_user": lift(0.0, -0.1, 0.1)}},
    }}
    v = verdict(report)
    assert v[0] == ("treatment raises conversion by +4.1% (95% CI +1.2% to +7.0%) over control; "
                    "click-through rate not significantly different, revenue per user not significantly different.")
    assert v[1].startswith("b lowers click-through rate by -5.0% (95% CI -8.0% to -2.0%) over control")


def test_verdict_on_a_simulated_experiment_finds_the_real_effect():
    from towerline.marketing.experiment_report import report_from_users
    from towerline.marketing.simulation import simulate_per_user

    users = simulate_per_user(TWO, 40_000, {"control": (0.05, 0.05, 30.0), "treatment": (0.05, 0.065, 30.0)}, seed=4)
    v = report_from_users(users, TWO, n_boot=300)["verdict"]
    assert len(v) == 1 and v[0].startswith("treatment raises conversion by +")


def test_simulated_feedback_is_marked_and_money_carries_the_currency(store, tmp_path, assert_valid_html5):
    exp = ExperimentConfig("home-feed", TWO.arms, currency="GBP")
    simulate(store, exp, 2000, {"control": (0.1, 0.05, 20.0), "treatment": (0.1, 0.06, 20.0)}, seed=1)
    report = experiment_report(store, exp, n_boot=200)
    assert report["simulated"] == "yes" and report["currency"] == "GBP"
    html_path, _ = write_report(report, tmp_path)
    page = html_path.read_text()
    assert "simulated data" in page and "revenue per user, GBP" in page
    assert "lift in revenue_per_user" not in page and "SIMULATED" in format_report(report)
    assert_valid_html5(html_path)


def test_per_user_simulation_equals_what_the_store_returns(store):
    from towerline.marketing.simulation import simulate_per_user

    rates = {"control": (0.1, 0.05, 20.0), "treatment": (0.12, 0.06, 25.0)}
    simulate(store, TWO, 500, rates, seed=9)
    stored = store.per_user("home-feed").sort_values("user_id").reset_index(drop=True)
    direct = simulate_per_user(TWO, 500, rates, seed=9).sort_values("user_id").reset_index(drop=True)
    assert stored[["user_id", "arm", "impressions", "clicks", "purchases"]].equals(
        direct[["user_id", "arm", "impressions", "clicks", "purchases"]])
    np.testing.assert_allclose(stored["revenue"], direct["revenue"], atol=1e-9)


def test_95_percent_intervals_cover_a_known_lift_in_200_experiments():
    """200 small experiments with a known +20% lift: each 95% interval (per arm and of the lift) holds the
    truth in a share of experiments inside the 99.9% binomial band around 0.95 (181-199 of 200)."""
    from scipy.stats import binom
    from towerline.marketing.experiment_report import report_from_users
    from towerline.marketing.simulation import simulate_per_user

    true = {"control": (0.05, 0.05, 40.0), "treatment": (0.06, 0.06, 40.0)}
    truth = {"ctr": 0.05, "conversion": 0.05, "revenue_per_user": 0.05 * 40.0}
    n_exp = 200
    hits = {f"{kind}:{m}": 0 for kind in ("arm", "lift") for m in ("ctr", "conversion", "revenue_per_user")}
    for k in range(n_exp):
        report = report_from_users(simulate_per_user(TWO, 2000, true, seed=1000 + k), TWO, n_boot=400, seed=k)
        for m, t in truth.items():
            lo, hi = report["arms"]["control"][m]["ci"]
            hits[f"arm:{m}"] += lo <= t <= hi
            lo, hi = report["arms"]["treatment"]["lift"][m]["relative"]["ci"]
            hits[f"lift:{m}"] += lo <= 0.2 <= hi
    low, high = binom.ppf(0.0005, n_exp, 0.95), binom.ppf(0.9995, n_exp, 0.95)
    for key, h in hits.items():
        assert low <= h <= high, f"{key}: {h}/{n_exp} intervals hold the truth, band [{low:.0f}, {high:.0f}]"


def test_wilson_interval_is_exactly_zero_or_one_at_the_edges():
    """No clicks at all: the lower bound is 0, not a rounding residue a report would read as "above zero"."""
    for n in (7, 1000, 123_457):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(0, n)[1] > 0
        assert wilson_interval(n, n)[1] == 1.0 and wilson_interval(n, n)[0] < 1
