"""The simulated shop: known, heterogeneous campaign responses, and outcome data consistent with them."""

from __future__ import annotations

import numpy as np
import pytest
from towerline.errors import ConfigError
from towerline.marketing.simulator import (
    CAMPAIGN_CHANNELS,
    OFFERS,
    RESPONSE_TYPES,
    incremental_conversions,
    run_campaign,
    simulate_shop,
)


@pytest.fixture(scope="module")
def shop():
    return simulate_shop(3000, 300, seed=3)


def test_same_seed_gives_the_same_shop_and_campaign(shop):
    again = simulate_shop(3000, 300, seed=3)
    assert again.effects.equals(shop.effects)
    assert run_campaign(again, seed=5).equals(run_campaign(shop, seed=5))
    other = simulate_shop(3000, 300, seed=4)
    assert not np.allclose(other.effects["effect"].to_numpy()[:100], shop.effects["effect"].to_numpy()[:100])


def test_every_user_has_a_known_effect_for_every_channel_and_offer(shop):
    e = shop.effects
    assert len(e) == len(shop.profiles) * len(CAMPAIGN_CHANNELS) * len(OFFERS)
    assert np.allclose(e["effect"], e["p_treated"] - e["p_control"])
    assert e["p_control"].between(0, 1).all() and e["p_treated"].between(0, 1).all()


def test_effects_are_heterogeneous_with_all_four_response_types(shop):
    arm = shop.effect_of("email", "discount_10")
    shares = arm["response_type"].value_counts(normalize=True)
    assert set(shares.index) == set(RESPONSE_TYPES)
    assert shares.min() > 0.05, shares
    assert (arm["effect"] > 0.05).mean() > 0.1 and (arm["effect"] < -0.02).mean() > 0.05
    by_type = arm.groupby("response_type")
    assert by_type["effect"].mean()["persuadable"] > 0.02 > 0 > -0.02 > by_type["effect"].mean()["sleeping dog"]
    assert by_type["p_control"].mean()["sure thing"] > by_type["p_control"].mean()["lost cause"]


def test_a_bigger_discount_moves_persuadables_more_and_sms_annoys_sleeping_dogs_more(shop):
    small, big = shop.effect_of("email", "discount_10"), shop.effect_of("email", "discount_20")
    pers = small["response_type"] == "persuadable"
    assert (big.loc[pers, "effect"] >= small.loc[pers, "effect"] - 1e-9).all()
    email, sms = shop.effect_of("email", "reminder"), shop.effect_of("sms", "reminder")
    dogs = (email["response_type"] == "sleeping dog") & (email["p_control"] > 0.1)
    assert sms.loc[dogs, "effect"].mean() < email.loc[dogs, "effect"].mean()


def test_randomised_campaign_outcomes_match_the_true_rates(shop):
    c = run_campaign(shop, holdout=0.5, seed=1)
    assert set(c["group"]) == {"treated", "holdout"}
    assert abs((c["group"] == "holdout").mean() - 0.5) < 0.04
    truth = shop.effect_of("email", "discount_10").reindex(c["user_id"])
    treated = (c["group"] == "treated").to_numpy()
    for grp, rate in ((treated, truth["p_treated"]), (~treated, truth["p_control"])):
        observed, expected = c["converted"][grp].mean(), rate[grp].mean()
        se = np.sqrt(expected * (1 - expected) / grp.sum())
        assert abs(observed - expected) < 4 * se
    assert (c.loc[~c["converted"], "revenue"] == 0).all() and (c.loc[c["converted"], "revenue"] > 0).all()
    assert c.loc[treated, "offer"].eq("discount_10").all() and c.loc[~treated, "offer"].isna().all()


def test_targeted_campaign_sends_only_to_the_chosen_users(shop):
    chosen = shop.profiles.loc[shop.profiles["consent"], "user_id"].iloc[:50].tolist()
    c = run_campaign(shop, arms=[("sms", "reminder")], send_to=chosen)
    assert set(c.loc[c["group"] == "treated", "user_id"]) == set(chosen)
    assert (c["group"] == "not sent").sum() == shop.profiles["consent"].sum() - 50


def test_users_who_refused_consent_are_never_contacted(shop):
    c = run_campaign(shop)
    refused = shop.profiles.loc[~shop.profiles["consent"], "user_id"]
    assert len(refused) and not c["user_id"].isin(refused).any()
    with pytest.raises(ConfigError, match="refused consent"):
        run_campaign(shop, user_ids=refused.tolist())
    with pytest.raises(ConfigError, match="refused consent"):
        run_campaign(shop, send_to=refused.tolist()[:1])


def test_incremental_conversions_is_the_sum_of_true_effects(shop):
    ids = shop.profiles["user_id"].iloc[:10].tolist()
    eff = shop.effect_of("push", "discount_20").loc[ids, "effect"].sum()
    assert incremental_conversions(shop, ids, "push", "discount_20") == pytest.approx(eff)
    with pytest.raises(ConfigError, match="not in the simulated shop"):
        incremental_conversions(shop, ["nobody"], "push", "discount_20")


def test_unknown_channel_or_offer_is_rejected_by_name(shop):
    with pytest.raises(ConfigError, match="unknown channel 'fax'"):
        run_campaign(shop, arms=[("fax", "reminder")])
    with pytest.raises(ConfigError, match="unknown offer"):
        shop.effect_of("email", "free_lunch")
