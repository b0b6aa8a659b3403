"""The campaign engine on hand-built event logs: each trigger fires for the right users on the right
day, consent per channel, segments, holdout, frequency caps and quiet hours hold, and a re-run
writes no duplicate. The CLI runs on the synthetic shop with a tiny trained bundle.

The ``recommend`` callables here are plain functions: that is the engine's interface for content
from the serving path (which marketing may not import); the CLI test covers the real adapter.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from towerline.errors import ConfigError, DataValidationError
from towerline.features.contracts import Dataset, Event
from towerline.marketing.campaign_config import campaign_from_dict, find_campaign, load_campaign, load_campaigns
from towerline.marketing.campaigns import (
    SEND,
    in_holdout,
    message_id,
    messages_for_events,
    parse_time,
    plan_campaign,
    preview_counts,
    run_campaign,
    triggered,
)
from towerline.marketing.outbox import ParquetOutbox, empty_messages

from support import REPO

DAY = 86_400
T0 = parse_time("2025-03-03T00:00:00Z")  # a Monday, 00:00 UTC


def at(day: float, hour: float = 0.0) -> int:
    return int(T0 + day * DAY + hour * 3600)


def shop(events: list[tuple[str, str, int, str]], users: pd.DataFrame | None = None) -> Dataset:
    """A data set from (user, item, time, event type) tuples; every user consents unless ``users`` says."""
    ev = pd.DataFrame(events, columns=["user_id", "item_id", "timestamp", "event_type"])
    ev["timestamp"] = ev["timestamp"].astype(np.int64)
    ev["value"] = np.where(ev["event_type"] == "purchase", 10.0, np.nan)
    ev["event_id"], ev["channel"] = None, None
    if users is None:
        users = pd.DataFrame({"user_id": sorted(ev["user_id"].unique()), "consent": True})
    items = pd.DataFrame({"item_id": sorted(ev["item_id"].unique())})
    return Dataset("hand-built", ev.sort_values(["user_id", "timestamp"]).reset_index(drop=True), items, users)


def campaign(**overrides) -> object:
    """A campaign with no holdout, no caps and no quiet hours unless the test asks for them."""
    base = {
        "name": "test",
        "trigger": {"kind": "purchase", "days": 3},
        "content": {"kind": "recommendations", "k": 2},
        "channels": ["email"],
        "holdout": 0.0,
        "eligibility": {"frequency_cap": {"per_user": 0, "per_campaign": 0}, "quiet_hours": {"start": None}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return campaign_from_dict(base)


def recommend(user_ids, k):
    return [[f"rec-{u}-{j}" for j in range(k)] for u in user_ids]


def sent(plan: pd.DataFrame) -> pd.DataFrame:
    return plan.loc[plan["status"] == SEND]


def plan_at(c, data, as_of, history=None, **kw) -> pd.DataFrame:
    return plan_campaign(c, data, as_of, empty_messages() if history is None else history, recommend=recommend, **kw)


# ----------------------------------------------------------------------------------------------
# triggers


def test_purchase_trigger_fires_on_the_nth_day_after_the_purchase_only():
    data = shop([
        ("a", "i1", at(0, 10), "purchase"),
        ("a", "i2", at(0, 18), "purchase"),  # same day: one message, about the day's latest purchase
        ("b", "i3", at(1, 10), "purchase"),
        ("c", "i4", at(0, 9), "view"),
    ])
    c = campaign(trigger={"kind": "purchase", "days": 3})
    rows = triggered(c, data, at(3, 9))
    assert rows["user_id"].tolist() == ["a"]
    assert rows["anchor_item"].tolist() == ["i2"] and rows["trigger_moment"].tolist() == ["2025-03-03"]
    assert triggered(c, data, at(4, 9))["user_id"].tolist() == ["b"]
    assert triggered(c, data, at(2, 23)).empty and triggered(c, data, at(5, 9)).empty
    late = campaign(trigger={"kind": "purchase", "days": 3, "window_days": 2})
    assert sorted(triggered(late, data, at(4, 9))["user_id"]) == ["a", "b"]  # a is one day late, still sent


def test_events_after_the_run_time_are_not_seen():
    data = shop([("a", "i1", at(0, 10), "purchase")])
    c = campaign(trigger={"kind": "purchase", "days": 0})
    assert triggered(c, data, at(0, 9)).empty  # the purchase has not happened yet at 09:00
    assert triggered(c, data, at(0, 11))["user_id"].tolist() == ["a"]


def test_view_without_purchase_fires_the_next_day_with_the_viewed_item():
    data = shop([
        ("a", "i1", at(0, 10), "view"),  # viewed, never bought -> message
        ("b", "i2", at(0, 10), "view"),
        ("b", "i2", at(0, 11), "purchase"),  # bought the same day -> none
        ("c", "i3", at(0, 10), "view"),
        ("c", "i3", at(1, 8), "purchase"),  # bought before the run on day 1 -> none
        ("d", "i4", at(0, 10), "view"),
        ("d", "i4", at(1, 20), "purchase"),  # bought after the run: not yet known -> message
        ("e", "i5", at(1, 10), "view"),  # viewed on day 1: due on day 2
    ])
    c = campaign(trigger={"kind": "view_without_purchase", "days": 1}, content={"kind": "viewed_item", "k": 1})
    plan = plan_at(c, data, at(1, 9))
    assert sorted(sent(plan)["user_id"]) == ["a", "d"]
    assert dict(zip(plan["user_id"], plan["items"])) == {"a": ["i1"], "d": ["i4"]}
    assert sent(plan_at(c, data, at(2, 9)))["user_id"].tolist() == ["e"]


def test_signup_trigger_reads_signup_ts_and_signup_events():
    users = pd.DataFrame({"user_id": ["a", "b", "c"], "consent": True,
                          "signup_ts": [at(0, 8), at(1, 8), None]})
    data = shop([("a", "i1", at(0, 9), "view"), ("c", "-", at(0, 7), "signup")], users)
    c = campaign(trigger={"kind": "signup", "days": 0})
    assert sorted(triggered(c, data, at(0, 12))["user_id"]) == ["a", "c"]
    assert triggered(c, data, at(1, 12))["user_id"].tolist() == ["b"]
    week = campaign(trigger={"kind": "signup", "days": 7})
    assert sorted(triggered(week, data, at(7, 12))["user_id"]) == ["a", "c"]


def test_churn_risk_trigger_reads_the_score_column_and_its_threshold():
    data = shop([(u, "i1", at(0, 9), "view") for u in "abcd"])
    scores = pd.DataFrame({"user_id": ["a", "b", "c"], "churn_probability": [0.9, 0.61, 0.2]})
    c = campaign(trigger={"kind": "churn_risk", "threshold": 0.6})
    plan = plan_at(c, data, at(5, 9), scores=scores)
    assert sorted(sent(plan)["user_id"]) == ["a", "b"]
    assert set(plan["trigger_moment"]) == {"2025-03-08"}
    with pytest.raises(DataValidationError, match="churn_probability"):
        plan_at(c, data, at(5, 9))  # no scores anywhere: says which column and how to pass it


def test_scores_from_profiles_and_from_a_scores_table_join_by_user():
    data = shop([(u, "i1", at(0, 9), "view") for u in "abc"])
    profiles = pd.DataFrame({"user_id": ["a", "b", "c"], "segment": "active", "churn_probability": [0.9, 0.9, 0.1]})
    scores = pd.DataFrame({"user_id": ["b"], "churn_probability": [0.1]})  # newer score wins over the profile's
    c = campaign(trigger={"kind": "churn_risk", "threshold": 0.5})
    assert sent(plan_at(c, data, at(1), profiles=profiles, scores=scores))["user_id"].tolist() == ["a"]


# ----------------------------------------------------------------------------------------------
# eligibility


def test_consent_per_channel_picks_the_first_allowed_channel_and_false_consent_gets_nothing():
    users = pd.DataFrame({
        "user_id": ["all", "no-email", "none", "refused", "missing-cols"],
        "consent": [True, True, True, False, True],
        "consent_email": [True, False, False, True, True],
        "consent_push": [True, True, False, True, None],
    })
    ids = users["user_id"].tolist() + ["not-in-users"]
    data = shop([(u, "i1", at(0, 9), "purchase") for u in ids], users)
    c = campaign(trigger={"kind": "purchase", "days": 0}, channels=["email", "push"])
    plan = plan_at(c, data, at(0, 12))
    got = dict(zip(sent(plan)["user_id"], sent(plan)["channel"]))
    assert got == {"all": "email", "no-email": "push", "missing-cols": "email"}
    status = dict(zip(plan["user_id"], plan["status"]))
    assert status["none"] == "no_channel_consent"
    assert status["refused"] == "no_consent" and status["not-in-users"] == "no_consent"

    every = campaign(trigger={"kind": "purchase", "days": 0}, channels=["email", "push"], channel_policy="all")
    both = sent(plan_at(every, data, at(0, 12)))
    assert sorted(both.loc[both["user_id"] == "all", "channel"]) == ["email", "push"]
    assert both["message_id"].is_unique  # one id per channel under channel_policy: all


def test_a_message_on_every_channel_counts_once_against_the_caps(tmp_path):
    data = shop([("a", "i1", at(0, 9), "purchase"), ("a", "i1", at(1, 9), "purchase")])
    c = campaign(trigger={"kind": "purchase", "days": 0}, channels=["email", "push"], channel_policy="all",
                 eligibility={"frequency_cap": {"per_user": 0, "per_campaign": 1, "per_campaign_days": 7}})
    outbox = ParquetOutbox(tmp_path / "outbox")
    first = run_campaign(c, data, at(0, 12), outbox, recommend=recommend)
    assert sorted(first.messages["channel"]) == ["email", "push"]  # one contact on two channels
    second = run_campaign(c, data, at(1, 12), outbox, recommend=recommend)
    assert second.messages.empty and second.counts == {"capped": 2}


def test_holdout_users_get_nothing_and_stay_held_out():
    users = [f"u{i:04d}" for i in range(2000)]
    data = shop([(u, "i1", at(0, 9), "purchase") for u in users])
    c = campaign(trigger={"kind": "purchase", "days": 0}, holdout=0.2)
    plan = plan_at(c, data, at(0, 12))
    held = set(plan.loc[plan["status"] == "holdout", "user_id"])
    assert held == {u for u, h in zip(users, in_holdout("test", users, 0.2)) if h}
    assert 0.17 < len(held) / len(users) < 0.23
    assert not held & set(sent(plan)["user_id"])
    again = plan_at(c, data, at(0, 13))
    assert set(again.loc[again["status"] == "holdout", "user_id"]) == held  # stable hash, not a draw


def test_segments_restrict_the_audience():
    data = shop([(u, "i1", at(0, 9), "purchase") for u in "abc"])
    profiles = pd.DataFrame({"user_id": ["a", "b", "c"], "segment": ["active", "churned", "loyal"],
                             "rfm_group": ["Champions", "Lost", "Champions"]})
    c = campaign(trigger={"kind": "purchase", "days": 0}, eligibility={"segments": ["active", "Lost"]})
    plan = plan_at(c, data, at(0, 12), profiles=profiles)
    assert sorted(sent(plan)["user_id"]) == ["a", "b"]  # a by lifecycle segment, b by RFM group
    assert plan.loc[plan["user_id"] == "c", "status"].item() == "segment"


def test_frequency_caps_count_the_outbox_per_user_and_per_campaign(tmp_path):
    data = shop([(u, "i1", at(d, 9), "purchase") for u in "ab" for d in range(4)])
    outbox = ParquetOutbox(tmp_path / "outbox")
    c = campaign(trigger={"kind": "purchase", "days": 0},
                 eligibility={"frequency_cap": {"per_user": 0, "per_campaign": 2, "per_campaign_days": 7}})
    per_day = [len(run_campaign(c, data, at(d, 12), outbox, recommend=recommend).messages) for d in range(4)]
    assert per_day == [2, 2, 0, 0]  # two messages per user per 7 days from this campaign
    capped = plan_at(c, data, at(3, 12), outbox.history())
    assert set(capped["status"]) == {"capped"}

    other = campaign(name="other", trigger={"kind": "purchase", "days": 0},
                     eligibility={"frequency_cap": {"per_user": 2, "per_user_days": 7, "per_campaign": 0}})
    plan = plan_at(other, data, at(3, 12), outbox.history())
    assert set(plan["status"]) == {"capped"}  # each user already had 2 messages (of any campaign) in 7 days
    assert len(sent(plan_at(other, data, at(3, 12), outbox.history().iloc[:2]))) == 2  # with 1 each: allowed
    assert len(sent(plan_at(other, data, at(12, 12), outbox.history()))) == 0  # no purchase on day 12
    old = campaign(name="other", trigger={"kind": "purchase", "days": 0, "window_days": 20},
                   eligibility={"frequency_cap": {"per_user": 2, "per_user_days": 7, "per_campaign": 0}})
    assert len(sent(plan_at(old, data, at(12, 12), outbox.history()))) == 4  # 7 days on, the cap has passed


def test_a_run_within_one_window_caps_several_triggers_of_one_user():
    data = shop([("a", "i1", at(0, 9), "purchase"), ("a", "i2", at(1, 9), "purchase")])
    c = campaign(trigger={"kind": "purchase", "days": 3, "window_days": 3},
                 eligibility={"frequency_cap": {"per_user": 0, "per_campaign": 1}})
    plan = plan_at(c, data, at(4, 12))
    assert plan.set_index("trigger_moment")["status"].to_dict() == {"2025-03-03": "send", "2025-03-04": "capped"}


def test_quiet_hours_defer_push_and_sms_to_their_end_not_email():
    users = pd.DataFrame({"user_id": ["p", "e"], "consent": True, "consent_email": [False, True],
                          "consent_push": [True, False]})
    data = shop([(u, "i1", at(0, 9), "purchase") for u in "pe"], users)
    c = campaign(trigger={"kind": "purchase", "days": 0}, channels=["email", "push"],
                 eligibility={"quiet_hours": {"start": "21:00", "end": "08:00", "channels": ["push", "sms"]}},
                 timezone="Europe/Berlin")
    late = sent(plan_at(c, data, at(0, 22))).set_index("user_id")  # 23:00 in Berlin
    assert late.loc["e", "send_at"] == at(0, 22)
    assert late.loc["p", "send_at"] == at(1, 7)  # 08:00 Berlin (UTC+1) the next morning
    day = sent(plan_at(c, data, at(0, 12))).set_index("user_id")
    assert (day["send_at"] == at(0, 12)).all()
    early = sent(plan_at(c, data, at(0, 21) + 0)).set_index("user_id")  # 22:00 Berlin
    assert early.loc["p", "send_at"] == at(1, 7)


def test_quiet_hours_given_unquoted_in_yaml_are_still_hours(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("name: q\neligibility:\n  quiet_hours: {start: 21:00, end: 07:30}\n")
    quiet = load_campaign(f).eligibility.quiet_hours
    assert (quiet.start, quiet.end) == ("21:00", "07:30")


# ----------------------------------------------------------------------------------------------
# offers


def test_ltv_tiers_give_the_highest_tier_reached():
    data = shop([(u, "i1", at(0, 9), "purchase") for u in "abcd"])
    scores = pd.DataFrame({"user_id": list("abc"), "predicted_ltv": [20.0, 150.0, 900.0]})
    c = campaign(trigger={"kind": "purchase", "days": 0},
                 offer={"kind": "ltv_tiers", "unit": "percent",
                        "tiers": [{"min_score": 0, "value": 5}, {"min_score": 100, "value": 10}, {"min_score": 500, "value": 15}]})
    plan = sent(plan_at(c, data, at(0, 12), scores=scores)).set_index("user_id")
    assert plan["offer"].fillna("none").to_dict() == {"a": "5%", "b": "10%", "c": "15%", "d": "none"}  # d: no score


def test_uplift_offers_go_to_the_highest_uplift_within_the_budget():
    users = list("abcdef")
    data = shop([(u, "i1", at(0, 9), "purchase") for u in users])
    scores = pd.DataFrame({"user_id": users, "predicted_uplift": [0.05, 0.30, -0.1, 0.20, 0.10, 0.0]})
    c = campaign(trigger={"kind": "purchase", "days": 0},
                 offer={"kind": "uplift_budget", "unit": "amount", "value": 5.0, "budget": 15.0})
    plan = sent(plan_at(c, data, at(0, 12), scores=scores)).set_index("user_id")
    assert set(plan.index[plan["offer"].notna()]) == {"b", "d", "e"}  # 3 offers of 5.00 fit the budget of 15
    assert plan.loc["b", "offer"] == "5.00" and plan["offer_value"].sum() == 15.0
    assert len(plan) == 6  # the others still get the message, without an offer


def test_fixed_offer_and_no_offer():
    data = shop([("a", "i1", at(0, 9), "purchase")])
    fixed = campaign(trigger={"kind": "purchase", "days": 0}, offer={"kind": "fixed", "unit": "percent", "value": 10})
    assert sent(plan_at(fixed, data, at(0, 12)))["offer"].tolist() == ["10%"]
    none = campaign(trigger={"kind": "purchase", "days": 0})
    assert sent(plan_at(none, data, at(0, 12)))["offer"].isna().all()


# ----------------------------------------------------------------------------------------------
# running: idempotence, preview, immediate signups


def test_rerunning_for_the_same_time_writes_no_duplicate(tmp_path):
    data = shop([(u, "i1", at(0, 9), "purchase") for u in "abc"])
    c = campaign(trigger={"kind": "purchase", "days": 3})
    outbox = ParquetOutbox(tmp_path / "outbox")
    first = run_campaign(c, data, at(3, 9), outbox, recommend=recommend)
    assert len(first.messages) == 3 and set(first.counts) == {SEND}
    second = run_campaign(c, data, at(3, 9), outbox, recommend=recommend)
    later = run_campaign(c, data, at(3, 15), outbox, recommend=recommend)  # later the same day: same ids
    assert len(second.messages) == 0 and len(later.messages) == 0
    assert second.counts == {"already_sent": 3}
    written = outbox.history()
    assert len(written) == 3 and written["message_id"].is_unique
    assert len(list((tmp_path / "outbox").glob("part-*.parquet"))) == 1
    assert set(written["message_id"]) == {message_id("test", u, "2025-03-03") for u in "abc"}
    row = written.set_index("user_id").loc["a"]
    assert list(row["items"]) == ["rec-a-0", "rec-a-1"] and row["channel"] == "email"
    assert "purchase on 2025-03-03" in row["reason"] and row["created_at"] == at(3, 9)


def test_preview_counts_per_status_trigger_channel_segment_and_offer():
    users = pd.DataFrame({"user_id": list("abcd"), "consent": [True, True, True, False],
                          "consent_email": [True, False, True, True]})
    data = shop([(u, "i1", at(0, 9), "purchase") for u in "abcd"] + [("a", "i2", at(1, 9), "purchase")], users)
    profiles = pd.DataFrame({"user_id": list("abcd"), "segment": ["active", "new", "active", "new"]})
    c = campaign(trigger={"kind": "purchase", "days": 3, "window_days": 2}, channels=["email", "push"],
                 offer={"kind": "fixed", "unit": "percent", "value": 10})
    plan = plan_campaign(c, data, at(4, 9), empty_messages(), profiles=profiles, with_content=False)
    counts = preview_counts(plan)
    assert counts["status"] == {"no_consent": 1, SEND: 4}
    assert counts["trigger"] == {"2025-03-03": 3, "2025-03-04": 1}
    assert counts["channel"] == {"email": 3, "push": 1}
    assert counts["segment"] == {"active": 3, "new": 1}
    assert counts["offer"] == {"10%": 4}


def test_messages_for_signup_events_fire_now_with_the_batch_runs_ids(tmp_path):
    welcome = campaign(name="welcome", trigger={"kind": "signup", "days": 0})
    later = campaign(name="day-7", trigger={"kind": "signup", "days": 7})
    purchase = campaign(name="after-purchase", trigger={"kind": "purchase", "days": 0})
    users = pd.DataFrame({"user_id": ["new", "shy"], "consent": [True, False]})
    events = [Event(user_id="new", item_id="-", timestamp=at(0, 10), event_type="signup"),
              Event(user_id="shy", item_id="-", timestamp=at(0, 10), event_type="signup"),
              Event(user_id="new", item_id="i1", timestamp=at(0, 10), event_type="purchase")]
    msgs = messages_for_events([welcome, later, purchase], events, users, empty_messages(), recommend=recommend)
    assert msgs["user_id"].tolist() == ["new"] and msgs["campaign"].tolist() == ["welcome"]
    assert msgs["message_id"].item() == message_id("welcome", "new", "2025-03-03")

    outbox = ParquetOutbox(tmp_path / "outbox")
    outbox.publish(msgs)
    data = shop([("new", "-", at(0, 10), "signup")], users)
    nightly = run_campaign(welcome, data, at(0, 23), outbox, recommend=recommend)
    assert len(nightly.messages) == 0 and nightly.counts.get("already_sent") == 1
    again = messages_for_events([welcome], events, users, outbox.history(), recommend=recommend)
    assert again.empty
    assert messages_for_events([welcome], events[2:], users, empty_messages(), recommend=recommend).empty
    no_clock = [Event(user_id="new", item_id="-", event_type="signup")]  # the server's clock decides the day
    msgs = messages_for_events([welcome], no_clock, users, empty_messages(), now=at(5, 10), recommend=recommend)
    assert msgs["trigger_moment"].tolist() == ["2025-03-08"]


# ----------------------------------------------------------------------------------------------
# definitions


def test_the_example_campaigns_load():
    campaigns = {c.name: c for c in load_campaigns(REPO / "configs" / "campaigns")}
    assert {"welcome", "related-after-purchase", "viewed-not-bought", "win-back"} <= set(campaigns)
    assert campaigns["related-after-purchase"].trigger.days == 3
    assert campaigns["viewed-not-bought"].trigger.kind == "view_without_purchase"
    assert campaigns["win-back"].offer.column == "predicted_ltv"


def test_a_misspelt_key_is_an_error_with_a_suggestion(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\ntrigger: {kind: purchase, dayz: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trigger.dayz'; did you mean 'days'\?"):
        load_campaign(f)
    with pytest.raises(ConfigError, match=r"'trigger.kind'.*did you mean 'purchase'"):
        campaign_from_dict({"name": "x", "trigger": {"kind": "purchases"}})
    with pytest.raises(ConfigError, match="holdout"):
        campaign_from_dict({"name": "x", "holdout": 1.5})
    with pytest.raises(ConfigError, match="content.kind"):
        campaign_from_dict({"name": "x", "trigger": {"kind": "signup"}, "content": {"kind": "viewed_item"}})
    with pytest.raises(ConfigError, match="offer.budget"):
        campaign_from_dict({"name": "x", "offer": {"kind": "uplift_budget", "unit": "amount", "value": 5}})
    with pytest.raises(ConfigError, match="did you mean 'welcome'"):
        find_campaign("welcom", REPO / "configs" / "campaigns")


def test_as_of_accepts_iso_and_epoch_and_rejects_the_rest():
    assert parse_time("2025-03-03") == T0 == parse_time(str(T0)) == parse_time("2025-03-03T01:00:00+01:00")
    with pytest.raises(ConfigError, match="--as-of"):
        parse_time("yesterday")


# ----------------------------------------------------------------------------------------------
# with a trained model: similar items, item-launch audiences, the CLI


def test_similar_to_purchased_gives_the_purchased_items_neighbours(tiny_run):
    from towerline.training.bundle import load_bundle
    from towerline.marketing.campaigns import similar_items

    bundle = load_bundle(tiny_run.bundle_dir)
    items = [str(i) for i in bundle.vocabs.items.ids[:3]]
    near = similar_items(bundle, items + ["unknown-item"], 4)
    assert [len(n) for n in near] == [4, 4, 4, 0]
    assert all(i not in n for i, n in zip(items, near))
    v = bundle.item_embeddings
    anchor = bundle.vocabs.items.encode_one(items[0])
    best = bundle.vocabs.items.decode([int(np.argsort(-(v[2:] @ v[anchor]))[j]) + 2 for j in range(6)])
    assert near[0][0] in list(best)[:2]  # the nearest by inner product (itself, if it is first, excluded)

    data = shop([("u1", items[0], at(0, 9), "purchase")], pd.DataFrame({"user_id": ["u1"], "consent": [True]}))
    c = campaign(trigger={"kind": "purchase", "days": 3}, content={"kind": "similar_to_purchased", "k": 3})
    plan = sent(plan_campaign(c, data, at(3, 9), empty_messages(), bundle=bundle))
    assert plan["items"].tolist() == [near[0][:3]]


def test_item_launch_messages_the_items_audience_on_launch_day(tiny_run):
    from towerline.training.bundle import load_bundle

    bundle = load_bundle(tiny_run.bundle_dir)
    item = str(bundle.vocabs.items.ids[5])
    users = pd.DataFrame({"user_id": bundle.vocabs.users.ids.astype(str), "consent": True})
    data = Dataset("x", shop([("u", item, at(0), "view")]).events, pd.DataFrame({"item_id": [item]}), users)
    c = campaign(trigger={"kind": "item_launch", "item_id": item, "launch_at": "2025-03-05", "audience_size": 20},
                 content={"kind": "item_audience", "k": 1})
    plan = plan_campaign(c, data, at(2, 10), empty_messages(), bundle=bundle)
    assert len(sent(plan)) == 20 and set(map(tuple, sent(plan)["items"])) == {(item,)}
    assert plan_campaign(c, data, at(1, 10), empty_messages(), bundle=bundle).empty  # before the launch


def test_cli_campaign_run_on_the_synthetic_shop_writes_an_outbox(tiny_run, tmp_path, capsys):
    from towerline.cli import main

    data = tmp_path / "data"
    assert main(["data", "generate", "--out", str(data), "--users", "300", "--items", "60", "--seed", "0",
                 "--no-progress"]) == 0
    outbox = tmp_path / "outbox"
    common = ["--data", str(data), "--as-of", "2025-06-22T09:00", "--campaigns", str(REPO / "configs" / "campaigns")]
    assert main(["campaign", "preview", "related-after-purchase", *common]) == 0
    preview = capsys.readouterr().out
    assert "by channel:" in preview and "by segment:" in preview

    run = ["campaign", "run", "related-after-purchase", *common, "--model", str(tiny_run.bundle_dir), "--outbox", str(outbox)]
    assert main(run) == 0
    msgs = pd.read_parquet(outbox)
    assert len(msgs) >= 1 and msgs["message_id"].is_unique
    assert (msgs["items"].map(len) > 0).all() and set(msgs["channel"]) <= {"email", "push"}
    assert main(run) == 0  # re-run: nothing new
    assert "published 0 new messages" in capsys.readouterr().out
    assert len(pd.read_parquet(outbox)) == len(msgs)

    welcome = ["campaign", "run", "welcome", "--data", str(data), "--as-of", "2025-06-23T09:00", "--campaigns",
               str(REPO / "configs" / "campaigns"), "--model", str(tiny_run.bundle_dir), "--outbox", str(outbox)]
    assert main(welcome) == 0  # content through the serving path (Recommender)
    out = pd.read_parquet(outbox)
    new = out.loc[out["campaign"] == "welcome"]
    assert len(new) >= 1 and (new["items"].map(len) == 4).all()
    assert (new["offer"] == "10%").all()

    # win-back reads hand-made scores: churn probability for the trigger, LTV for the offer tier
    users = pd.read_parquet(data / "users.parquet")["user_id"].astype(str)
    rng = np.random.default_rng(0)
    scores = pd.DataFrame({"user_id": users, "churn_probability": rng.random(len(users)),
                           "predicted_ltv": rng.choice([50.0, 200.0, 800.0], len(users))})
    scores.to_parquet(tmp_path / "scores.parquet")
    win_back = ["campaign", "run", "win-back", *common, "--model", str(tiny_run.bundle_dir), "--outbox", str(outbox),
                "--scores", str(tmp_path / "scores.parquet")]
    assert main(win_back) == 0
    got = pd.read_parquet(outbox).query("campaign == 'win-back'").merge(scores, on="user_id")
    assert len(got) >= 1 and (got["churn_probability"] > 0.6).all()
    tier = got["predicted_ltv"].map({50.0: "5%", 200.0: "10%", 800.0: "15%"})
    assert (got["offer"] == tier).all() and set(got["channel"]) <= {"email", "sms"}

    # without --scores the run trains the churn and LTV models on the log up to --as-of itself
    from towerline.marketing.campaigns import load_inputs

    inputs = load_inputs(str(data), parse_time("2025-06-22T09:00"), score_columns=["churn_probability", "predicted_ltv"])
    made = inputs.profiles.set_index("user_id")[["churn_probability", "predicted_ltv"]]
    assert made["churn_probability"].notna().sum() > 50 and (made["predicted_ltv"].dropna() >= 0).all()
    own = [a for a in win_back if a not in ("--scores", str(tmp_path / "scores.parquet"))]
    own[own.index(str(outbox))] = str(tmp_path / "outbox-own")
    assert main(own) == 0
    got = pd.read_parquet(tmp_path / "outbox-own").merge(made, left_on="user_id", right_index=True)
    assert len(got) >= 1 and (got["churn_probability"] > 0.6).all()
    tier = np.select([got["predicted_ltv"] >= 500, got["predicted_ltv"] >= 100], ["15%", "10%"], "5%")
    assert (got["offer"] == tier).all()


def test_cli_bad_name_or_time_is_one_error_line(tmp_path, capsys):
    from towerline.cli import main

    rc = main(["campaign", "preview", "welcom", "--data", str(tmp_path), "--as-of", "2025-06-01",
               "--campaigns", str(REPO / "configs" / "campaigns")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "did you mean 'welcome'" in err[0]
    rc = main(["campaign", "preview", "welcome", "--data", str(tmp_path), "--as-of", "soon",
               "--campaigns", str(REPO / "configs" / "campaigns")])
    assert rc == 2 and "--as-of" in capsys.readouterr().err


def test_a_campaign_that_needs_the_model_fails_without_one_even_on_a_quiet_day():
    data = shop([("a", "i1", at(0, 9), "view")])  # nothing triggers
    for content in ("recommendations", "similar_to_purchased"):
        c = campaign(trigger={"kind": "purchase", "days": 0}, content={"kind": content})
        with pytest.raises(ConfigError, match="pass --model"):
            plan_campaign(c, data, at(0, 12), empty_messages())
        assert plan_campaign(c, data, at(0, 12), empty_messages(), with_content=False).empty  # preview needs none


def test_campaign_commands_have_help_with_examples(capsys):
    from towerline.cli import main

    for argv in (["campaign", "--help"], ["campaign", "run", "--help"], ["campaign", "preview", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "towerline campaign" in out
    with pytest.raises(SystemExit) as e:
        main(["campaign", "run", "welcome", "--bogus"])
    assert e.value.code == 2


def test_the_cli_recommender_sees_events_newer_than_the_model(tiny_run):
    from towerline.training.bundle import load_bundle
    from towerline.commands.campaign import serving_recommend
    from towerline.marketing.campaigns import events_after_training

    bundle = load_bundle(tiny_run.bundle_dir)
    last = int(bundle.histories.timestamp.max())
    items = [str(i) for i in bundle.vocabs.items.ids[10:14]]
    data = shop([("u000001", items[0], last - 10, "view")]
                + [("visitor", i, last + 60 * (j + 1), "view") for j, i in enumerate(items)])
    recent = events_after_training(bundle, data, last + 3600)
    assert recent["user_id"].tolist() == ["visitor"] * 4  # the older event is already in the model
    assert events_after_training(bundle, data, last + 90)["user_id"].tolist() == ["visitor"]  # not after as_of

    cold = serving_recommend(str(tiny_run.bundle_dir))(["visitor"], 5)[0]
    warm = serving_recommend(str(tiny_run.bundle_dir), recent)(["visitor"], 5)[0]
    assert len(cold) == len(warm) == 5
    assert cold != warm  # popular fallback without the events, personalised with them
    assert not set(items) & set(warm)  # seen items are dropped by the serving rules


def test_a_run_records_its_holdout_beside_the_messages_and_the_report_reads_both(tmp_path):
    from towerline.marketing.campaign_report import read_outbox

    users = [f"u{i}" for i in range(40)]
    data = shop([(u, "i1", at(0, 9), "purchase") for u in users])
    c = campaign(trigger={"kind": "purchase", "days": 3}, holdout=0.3)
    outbox = ParquetOutbox(tmp_path / "outbox")
    first = run_campaign(c, data, at(3, 9), outbox, recommend=recommend)
    held = outbox.holdout_history()
    assert len(held) == first.counts["holdout"] > 0 and len(outbox.history()) == first.counts[SEND] > 0
    assert not set(held["user_id"]) & set(outbox.history()["user_id"])  # nobody held out was messaged
    assert set(held["user_id"]) == {u for u, h in zip(users, in_holdout("test", users, 0.3)) if h}
    run_campaign(c, data, at(3, 9), outbox, recommend=recommend)  # a re-run records no holdout row twice either
    assert len(outbox.holdout_history()) == len(held)
    report_rows = read_outbox(tmp_path / "outbox")
    assert report_rows["holdout"].sum() == len(held) and (~report_rows["holdout"]).sum() == first.counts[SEND]
    assert (report_rows["sent_at"] == at(3, 9)).all()


def test_an_uplift_budget_offer_learns_who_to_give_it_from_an_earlier_campaigns_holdout(tmp_path):
    """A first campaign (fixed offer, half held out) is the experiment; in the week after it, only
    the treated browsers (never bought) are moved to buy, buyers buy as often either way. The next
    campaign's uplift_budget offers, learnt from that outbox, go to browsers."""
    rng = np.random.default_rng(0)
    users = [f"u{i:03d}" for i in range(600)]
    browser = {u: i % 2 == 0 for i, u in enumerate(users)}
    events = [(u, "i2", at(d, 9), "purchase") for u in users if not browser[u] for d in (2, 10, 20)]
    events += [(u, "i1", at(29, 9), "view") for u in users]
    explore = campaign(name="explore", trigger={"kind": "view_without_purchase", "days": 0},
                       content={"kind": "viewed_item", "k": 1}, offer={"kind": "fixed", "unit": "percent", "value": 10},
                       holdout=0.5)
    outbox = ParquetOutbox(tmp_path / "outbox")
    run_campaign(explore, shop(events), at(29, 12), outbox)
    treated = set(outbox.history()["user_id"])
    assert 200 < len(treated) < 400 and len(outbox.holdout_history()) == 600 - len(treated)
    for u in users:
        p = (0.5 if u in treated else 0.02) if browser[u] else 0.3
        if rng.random() < p:
            events.append((u, "i3", at(31, 10), "purchase"))
    events += [(u, "i1", at(39, 9), "view") for u in users]  # everyone views again: the next trigger
    targeted = campaign(name="targeted", trigger={"kind": "view_without_purchase", "days": 1},
                        content={"kind": "viewed_item", "k": 1},
                        offer={"kind": "uplift_budget", "unit": "amount", "value": 5.0, "budget": 100.0,
                               "uplift_from": "explore"})
    data = shop(events)
    from towerline.marketing.campaigns import CampaignInputs, with_uplift_scores

    scores = with_uplift_scores(targeted, CampaignInputs(data), at(40, 9), outbox)
    run = run_campaign(targeted, data, at(40, 9), outbox, scores=scores)
    offered = run.messages.loc[run.messages["offer"].notna(), "user_id"]
    assert len(offered) == 20 and np.mean([browser[u] for u in offered]) >= 0.8
    assert (run.messages["offer"].dropna() == "5.00").all()
    with pytest.raises(DataValidationError, match="run 'targeted' with a holdout first"):
        with_uplift_scores(campaign(name="targeted", offer=targeted.offer.__dict__ | {"uplift_from": None}),
                           CampaignInputs(data), at(40, 9), outbox)
