"""Profiles on a hand-built event log whose RFM scores, groups, segments and tags are known."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from support import SHARED_DATA  # noqa: E402  (../shared beside the checkout)
from towerline.config import ProfileConfig
from towerline.errors import DataValidationError
from towerline.features.contracts import Dataset
from towerline.features.user_features import (
    PROFILE_COLUMNS,
    build_profiles,
    quintile_scores,
)
from towerline.marketing.clusters import cluster_users, label_clusters
from towerline.marketing.profile_report import write_profile_report
from towerline.marketing.profiles import (
    export_profiles,
    load_profiles,
    profile_of,
    profile_thresholds,
    segment_definitions,
    segment_summary,
)
from towerline.marketing.routes import MarketingService

DAY = 86_400
NOW = 1_750_000_000  # reference time, epoch seconds


def ev(user: str, item: str, days_ago: float, kind: str = "view", value: float | None = None, second: int = 0) -> dict:
    return {"user_id": user, "item_id": item, "timestamp": int(NOW - days_ago * DAY) + second, "event_type": kind,
            "value": np.nan if value is None else value, "event_id": None, "channel": None}


def dataset(rows: list[dict], consent: dict[str, bool] | None = None, attributes: dict[str, list[str]] | None = None) -> Dataset:
    events = pd.DataFrame(rows)
    items = sorted(set(events["item_id"]))
    attributes = attributes or {}
    catalogue = pd.DataFrame({"item_id": items, "attributes": [attributes.get(i, []) for i in items],
                              "price": np.nan, "in_stock": True, "title": None})
    users = sorted(set(events["user_id"]))
    consent = consent or {}
    return Dataset("hand", events, catalogue, pd.DataFrame({"user_id": users, "consent": [consent.get(u, True) for u in users]}))


def buyers_log() -> Dataset:
    """Five buyers: b1 best on every axis ... b5 worst; b1's last order has two lines (one order)."""
    rows = []
    spec = {"b1": (1, 5, 100.0), "b2": (10, 4, 100.0), "b3": (20, 3, 100.0), "b4": (40, 2, 100.0), "b5": (80, 1, 100.0)}
    for user, (last_days, n_orders, value) in spec.items():
        for k in range(n_orders):
            rows.append(ev(user, "i1", last_days + 3 * k, "purchase", value))
    rows.append(ev("b1", "i2", 1, "purchase", 100.0))  # same second as b1's newest order: same order
    return dataset(rows)


def test_quintile_scores_rank_values_and_share_ties():
    assert quintile_scores(np.array([10.0, 20, 30, 40, 50])).tolist() == [1, 2, 3, 4, 5]
    # tied zeros share the lowest score instead of being spread by an arbitrary tie-break
    assert quintile_scores(np.array([0.0, 0, 0, 5, 9])).tolist() == [1, 1, 1, 4, 5]
    assert quintile_scores(np.array([np.nan, 1.0])).tolist() == [1, 1]


def test_rfm_orders_value_scores_and_groups_match_hand_computation():
    p = build_profiles(buyers_log(), ProfileConfig(), reference_time=NOW).set_index("user_id")
    assert p.loc["b1", "frequency"] == 5  # two lines at the same second are one order
    assert p.loc["b1", "monetary"] == 600.0  # but both lines count as value
    assert p.loc["b3", "recency_days"] == pytest.approx(20.0)
    assert p["frequency_basis"].unique().tolist() == ["orders"]
    assert p["monetary_basis"].unique().tolist() == ["order_value"]
    assert p["r_score"].tolist() == [5, 4, 3, 2, 1]
    assert p["f_score"].tolist() == [5, 4, 3, 2, 1]
    assert p["rfm_score"].tolist() == ["555", "444", "333", "222", "111"]
    assert p["rfm_group"].tolist() == ["Champions", "Loyal", "Need attention", "Hibernating", "Lost"]


def test_lifecycle_segments_follow_config_thresholds():
    rows = [
        ev("newbie", "i1", 5), ev("newbie", "i2", 4),
        ev("regular", "i1", 150), ev("regular", "i2", 10, "purchase", 5.0),
        ev("fan", "i1", 150, "purchase", 5.0), ev("fan", "i1", 100, "purchase", 5.0), ev("fan", "i1", 10, "purchase", 5.0),
        ev("fading", "i1", 150), ev("fading", "i1", 60),
        ev("gone", "i1", 170), ev("gone", "i1", 120),
    ]
    cfg = ProfileConfig(new_days=30, active_days=30, at_risk_days=90, loyal_min_frequency=3)
    seg = build_profiles(dataset(rows), cfg, reference_time=NOW).set_index("user_id")["segment"]
    assert seg.to_dict() == {"fading": "at-risk", "fan": "loyal", "gone": "churned", "newbie": "new", "regular": "active"}
    # moving a threshold moves the user: with at_risk_days=50 the 60-day-old user has churned
    seg2 = build_profiles(dataset(rows), ProfileConfig(at_risk_days=50), reference_time=NOW).set_index("user_id")["segment"]
    assert seg2["fading"] == "churned"


def test_tags_are_weighted_by_recency_with_the_configured_half_life():
    rows = [ev("u", "old", 200), ev("u", "old", 201), ev("u", "old", 202), ev("u", "fresh", 1)]
    attrs = {"old": ["brand:old", "category:shared"], "fresh": ["brand:fresh", "category:shared"]}
    short = build_profiles(dataset(rows, attributes=attrs), ProfileConfig(tag_half_life_days=30, n_tags=2), reference_time=NOW)
    # three touches 200 days ago weigh 3 * 0.5**(200/30) ~ 0.03, one touch yesterday ~ 0.98
    assert short["tags"].iloc[0] == ["category:shared", "brand:fresh"]
    long = build_profiles(dataset(rows, attributes=attrs), ProfileConfig(tag_half_life_days=1e6, n_tags=2), reference_time=NOW)
    assert long["tags"].iloc[0] == ["category:shared", "brand:old"]


def test_data_without_orders_or_clock_uses_counts_and_says_so():
    rows = [{"user_id": u, "item_id": f"i{k}", "timestamp": k, "event_type": "interaction", "value": np.nan,
             "event_id": None, "channel": None} for u, n in (("a", 3), ("b", 6)) for k in range(n)]
    p = build_profiles(dataset(rows), ProfileConfig()).set_index("user_id")
    assert p.attrs["has_clock"] is False
    assert p["frequency_basis"].unique().tolist() == ["interaction_count"]
    assert p.loc["b", "frequency"] == 6 and p.loc["b", "monetary"] == 6
    assert p["segment"].unique().tolist() == ["unknown"]
    assert p["r_score"].isna().all()


def test_empty_events_are_refused():
    empty = dataset([ev("u", "i", 1)])
    empty.events = empty.events.iloc[:0]
    with pytest.raises(DataValidationError, match="no events"):
        build_profiles(empty, ProfileConfig())


def test_clusters_recover_separated_groups_and_are_labelled_by_distinctive_tags():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, (40, 8)) + np.eye(8)[0]
    b = rng.normal(0, 0.05, (40, 8)) + np.eye(8)[1] * 3  # longer vectors: spherical k-means ignores length
    labels, centroids = cluster_users(np.vstack([a, b]), 2, seed=1)
    assert centroids.shape == (2, 8)
    assert len(set(labels[:40])) == 1 and len(set(labels[40:])) == 1 and labels[0] != labels[40]
    again, _ = cluster_users(np.vstack([a, b]), 2, seed=1)
    assert (again == labels).all()

    profiles = pd.DataFrame({
        "cluster": labels,
        "tags": [["brand:a", "cat:everyone"]] * 40 + [["brand:b", "cat:everyone"]] * 40,
    })
    names = label_clusters(profiles)
    assert names[int(labels[0])][0] == "brand:a"
    assert names[int(labels[40])][0] == "brand:b"


def test_export_leaves_out_users_without_consent_and_any_event_columns(tmp_path):
    rows = [ev("yes", "i1", 3, "purchase", 9.0), ev("no", "i1", 3, "purchase", 9.0)]
    p = build_profiles(dataset(rows, consent={"no": False}), ProfileConfig(), reference_time=NOW)
    p["cluster"] = 0
    p["raw_events"] = [["i1@t"], ["i1@t"]]  # someone joined the log on; it must not leave
    path = export_profiles(p, tmp_path / "profiles.parquet")
    back = load_profiles(path)
    assert back["user_id"].tolist() == ["yes"]
    assert set(back.columns) <= set(PROFILE_COLUMNS)
    assert "raw_events" not in back.columns and "timestamp" not in back.columns and "item_id" not in back.columns
    assert profile_of(p, "no") is None
    assert profile_of(p, "yes").segment == "new"
    assert segment_summary(p, ProfileConfig())["users"] == 1


def test_report_shows_aggregates_and_names_no_user(tmp_path):
    rows = [ev(f"user{i:03d}", f"i{i % 3}", i, "purchase" if i % 2 else "view", 10.0 if i % 2 else None) for i in range(40)]
    p = build_profiles(dataset(rows, attributes={"i0": ["brand:x"], "i1": ["brand:y"]}), ProfileConfig(), reference_time=NOW)
    p["cluster"] = np.arange(len(p)) % 2
    out = write_profile_report(p, tmp_path / "report.html", label_clusters(p))
    text = out.read_text()
    assert text.count("data:image/png;base64,") >= 3
    assert "Lifecycle segments" in text and "Clusters of user embeddings" in text
    assert "user0" not in text


def test_segment_definitions_state_the_thresholds():
    defs = {d["name"]: d for d in segment_definitions(ProfileConfig(at_risk_days=77))}
    assert "77" in defs["at-risk"]["rule"] and defs["Champions"]["kind"] == "rfm"


def test_exported_profiles_carry_their_thresholds_to_segments(tmp_path):
    """``GET /segments`` must describe the segments as they were cut, not today's defaults."""
    rows = [ev("yes", "i1", 3, "purchase", 9.0), ev("old", "i1", 60, "purchase", 9.0)]
    cfg = ProfileConfig(active_days=20, at_risk_days=45)
    back = load_profiles(export_profiles(build_profiles(dataset(rows), cfg, reference_time=NOW), tmp_path / "p.parquet"))
    assert profile_thresholds(back) == cfg
    service = MarketingService([], None, tmp_path / "feedback.sqlite", tmp_path / "p.parquet")
    summary = service.segments()
    assert summary["thresholds"]["at_risk_days"] == 45 and summary["segments"] == {"new": 1, "churned": 1}
    assert any("45" in d["rule"] for d in summary["definitions"] if d["name"] == "at-risk")


@pytest.mark.skipif(not (SHARED_DATA / "Beauty.txt").exists(), reason="shared Beauty data set not present")
def test_beauty_profiles_in_seconds():
    from towerline.features.readers import load_dataset

    beauty, _ = load_dataset(SHARED_DATA / "Beauty.txt")
    start = time.perf_counter()
    p = build_profiles(beauty, ProfileConfig())
    elapsed = time.perf_counter() - start
    assert len(p) == 22_363
    assert elapsed < 10, f"profiling Beauty took {elapsed:.1f}s"
    assert p["tags"].map(len).gt(0).mean() > 0.9
