"""Report pages: campaign figures against hand-made outboxes, every page parsed as strict HTML5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from towerline.cli import main
from towerline.marketing.campaign_report import (
    CampaignReportSettings,
    campaign_report,
    link_engagement,
    offer_share,
    read_campaign_events,
    read_outbox,
    write_campaign_report,
)

DAY = 86_400
T0 = 1_767_225_600  # 2026-01-01 UTC


def _write_outbox(folder: Path, n_treated: int = 200, n_hold: int = 100) -> Path:
    rows = []
    for i in range(n_treated + n_hold):
        hold = i >= n_treated
        rows.append({"message_id": f"m{i}", "campaign": "spring", "user_id": f"u{i}", "channel": "email",
                     "items": ["i1", "i2"], "offer": "10%", "reason": "audience", "sent_at": T0, "holdout": hold})
    # a second channel for the first 40 recipients, a day later
    for i in range(40):
        rows.append({"message_id": f"p{i}", "campaign": "spring", "user_id": f"u{i}", "channel": "push",
                     "items": ["i1"], "offer": None, "reason": "audience", "sent_at": T0 + DAY, "holdout": False})
    rows.append({"message_id": "x0", "campaign": "other", "user_id": "z0", "channel": "sms", "items": [],
                 "offer": None, "reason": "trigger", "sent_at": T0, "holdout": False})
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    pq.write_table(pa.Table.from_pandas(frame.iloc[:150], preserve_index=False), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pandas(frame.iloc[150:], preserve_index=False), folder / "part-1.parquet")
    return folder


def _events(n_treated: int = 200, n_hold: int = 100) -> pd.DataFrame:
    ev = []
    for i in range(50):  # 50 of 200 recipients buy within the week, 20 each
        ev.append((f"u{i}", "i1", T0 + 2 * DAY, "purchase", 20.0, None, "web", None))
    for i in range(n_treated, n_treated + 10):  # 10 of 100 holdout users buy, 20 each
        ev.append((f"u{i}", "i1", T0 + 2 * DAY, "purchase", 20.0, None, "web", None))
    for i in range(60, 70):  # purchases after the window do not count
        ev.append((f"u{i}", "i1", T0 + 20 * DAY, "purchase", 99.0, None, "web", None))
    for i in range(80):  # opens linked by channel
        ev.append((f"u{i}", "-", T0 + 3600, "open", np.nan, None, "email", None))
    for i in range(30):  # clicks linked by message id
        ev.append((f"u{i}", "-", T0 + 7200, "click", np.nan, None, "email", f"m{i}"))
    ev.append(("u150", "-", T0 - DAY, "open", np.nan, None, "email", None))  # before any message: unlinked
    return pd.DataFrame(ev, columns=["user_id", "item_id", "timestamp", "event_type", "value", "event_id", "channel",
                                     "message_id"])


def test_campaign_figures_match_the_hand_made_outbox(tmp_path):
    outbox = read_outbox(_write_outbox(tmp_path / "outbox"))
    events = _events()
    report = campaign_report(outbox, events, "spring", CampaignReportSettings(costs={"email": 0.002, "push": 0.001}))
    c = report["campaigns"]["spring"]
    email = next(ch for ch in c["channels"] if ch["channel"] == "email")
    assert (email["sends"], email["opens"], email["clicks"], email["conversions"]) == (200, 80, 30, 50)
    assert email["revenue"] == pytest.approx(1000.0)
    inc = c["incremental"]
    assert inc["recipient_rate"]["value"] == pytest.approx(0.25) and inc["holdout_rate"]["value"] == pytest.approx(0.10)
    assert inc["conversions"]["value"] == pytest.approx(30.0)  # (0.25 - 0.10) x 200
    lo, hi = inc["conversions"]["ci"]
    assert lo < 30 < hi and inc["conversions"]["excludes_zero"]
    assert inc["revenue"]["value"] == pytest.approx(600.0)  # (5 - 2) x 200
    # cost: 200 e-mails x 0.002 + 40 pushes x 0.001 + 10% offer on the 50 e-mail converters' 1000
    eco = c["economics"]
    assert eco["cost"] == pytest.approx(0.4 + 0.04 + 100.0)
    assert eco["roi"]["value"] == pytest.approx((600 - eco["cost"]) / eco["cost"])
    assert eco["cac"] == pytest.approx(eco["cost"] / 30) and eco["ltv"] == pytest.approx(20.0)
    for model, credit in c["attribution"].items():
        assert sum(v["conversions"] for v in credit.values()) == pytest.approx(50), model
    # push reached 40 users who all converted after e-mail then push: last touch credits push for them
    assert c["attribution"]["last_touch"]["push"]["conversions"] == pytest.approx(40)


def test_outbox_sent_at_may_be_a_timestamp(tmp_path):
    folder = tmp_path / "ts"
    folder.mkdir()
    frame = pd.DataFrame({"message_id": ["m1"], "campaign": ["c"], "user_id": ["u1"], "channel": ["email"],
                          "sent_at": [pd.Timestamp(T0, unit="s")], "holdout": [False]})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / "part-0.parquet")
    assert read_outbox(folder)["sent_at"].tolist() == [T0]


def test_engagement_links_by_message_id_first_then_by_channel_and_time(tmp_path):
    outbox = read_outbox(_write_outbox(tmp_path / "outbox"))
    eng = link_engagement(outbox, _events(), 7 * DAY)
    assert set(eng.loc[eng["kind"] == "click", "message_id"]) == {f"m{i}" for i in range(30)}
    assert len(eng[eng["kind"] == "open"]) == 80  # the open before any message is not linked


def test_offer_share():
    assert offer_share("10%") == pytest.approx(0.1) and offer_share("15% off") == pytest.approx(0.15)
    assert offer_share("pct:5") == pytest.approx(0.05)
    assert offer_share("free shipping") == 0.0 and offer_share(None) == 0.0


def test_unknown_campaign_names_the_known_ones(tmp_path):
    from towerline.errors import DataValidationError

    outbox = read_outbox(_write_outbox(tmp_path / "outbox"))
    with pytest.raises(DataValidationError, match="other, spring"):
        campaign_report(outbox, _events(), "summer")


def test_campaign_report_command_writes_valid_html_and_json(tmp_path, assert_valid_html5):
    outbox = _write_outbox(tmp_path / "outbox")
    data = tmp_path / "data"
    data.mkdir()
    _events().to_csv(data / "events.csv", index=False)
    assert "message_id" in read_campaign_events(data)
    out = tmp_path / "reports"
    assert main(["campaign", "report", "all", "--outbox", str(outbox), "--data", str(data), "--out", str(out),
                 "--cost", "email=0.002"]) == 0
    report = json.loads((out / "campaign-all.json").read_text())
    assert set(report["campaigns"]) == {"spring", "other"}
    page = (out / "campaign-all.html").read_text()
    assert "Last touch" in page and "Markov" in page and "ROI" in page and "<img alt=" in page
    assert_valid_html5(out / "campaign-all.html")


def test_campaign_without_holdout_says_so(tmp_path):
    outbox = read_outbox(_write_outbox(tmp_path / "outbox"))
    report = campaign_report(outbox, _events(), "other")
    html_path, _ = write_campaign_report(report, tmp_path)
    assert "cannot be measured" in html_path.read_text()


# the profile report


def _synthetic_profiles(n_users: int = 400):
    from towerline.config import ProfileConfig
    from towerline.features.synthetic import generate_dataset
    from towerline.features.user_features import build_profiles

    ds = generate_dataset(n_users, 80, seed=3)
    p = build_profiles(ds, ProfileConfig(at_risk_days=77))
    p["cluster"] = np.arange(len(p)) % 3
    return p


def test_pretty_tag_reads_as_words():
    from towerline.marketing.profile_report import pretty_tag

    assert pretty_tag("price_band:1") == "Price band 1"
    assert pretty_tag("category:skincare") == "Category: skincare"
    assert pretty_tag("brand:b3") == "Brand: b3" and pretty_tag("plain") == "plain"


def test_profile_report_explains_thresholds_and_shows_revenue_per_segment(tmp_path, assert_valid_html5):
    from towerline.marketing.clusters import label_clusters
    from towerline.marketing.profile_report import write_profile_report

    p = _synthetic_profiles()
    page = write_profile_report(p, tmp_path / "report.html", label_clusters(p)).read_text()
    assert "77 days" in page  # the recorded at-risk threshold, not the default 90
    assert "share of revenue" in page and "no order values" not in page
    assert "Category: " in page or "Brand: " in page
    assert "category:" not in page.split("<h2>Most common interests</h2>")[0].split("Clusters of user embeddings")[-1]
    assert page.count("data:image/png;base64,") >= 5  # segments, groups, histograms, heatmap, clusters, tags
    assert_valid_html5(tmp_path / "report.html")


def test_profile_report_without_money_says_so(tmp_path, assert_valid_html5):
    from towerline.config import ProfileConfig
    from towerline.features.contracts import Dataset
    from towerline.features.user_features import build_profiles
    from towerline.marketing.profile_report import write_profile_report

    rng = np.random.default_rng(0)
    n = 600
    events = pd.DataFrame({"user_id": [f"u{i % 60}" for i in range(n)], "item_id": [f"i{k}" for k in rng.integers(0, 30, n)],
                           "timestamp": np.arange(n) // 60, "event_type": "interaction", "value": np.nan,
                           "event_id": None, "channel": None})  # S3Rec-like: positions, no money
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(30)], "attributes": [[f"price_band:{k % 4}"] for k in range(30)],
                          "price": np.nan, "in_stock": True, "title": None})
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(60)], "consent": True})
    p = build_profiles(Dataset("positions", events, items, users), ProfileConfig())
    page = write_profile_report(p, tmp_path / "r.html").read_text()
    assert "no order values in this data" in page and "median monetary" not in page and "0.00" not in page
    assert "Price band " in page
    assert_valid_html5(tmp_path / "r.html")


def test_campaign_results_by_segment_are_released_privately_and_charged(tmp_path):
    from towerline.marketing.profiles import export_profiles

    pytest.importorskip("opendp")
    outbox = _write_outbox(tmp_path / "outbox")
    data = tmp_path / "data"
    data.mkdir()
    _events().to_csv(data / "events.csv", index=False)
    users = [f"u{i}" for i in range(300)]
    profiles = pd.DataFrame({"user_id": users, "segment": ["new", "loyal", "churned"] * 100,
                             "consent": [i != 5 for i in range(300)]})
    export_profiles(profiles, tmp_path / "profiles.parquet")
    args = ["campaign", "report", "spring", "--outbox", str(outbox), "--data", str(data), "--out", str(tmp_path / "r"),
            "--private-by-segment", str(tmp_path / "profiles.parquet"), "--ledger", str(tmp_path / "ledger.json")]
    assert main(args + ["--epsilon", "0.6", "--budget", "1.0"]) == 0
    table = pd.read_csv(tmp_path / "r" / "campaign-spring-by-segment-dp.csv")
    assert len(table) == 12  # 6 segments x {recipient, holdout}, empty cells included
    assert set(table.columns) == {"segment", "holdout", "users", "conversions", "revenue", "conversion_rate"}
    assert not table.astype(str).apply(lambda c: c.str.fullmatch(r"u\d+")).any().any()
    assert json.loads((tmp_path / "ledger.json").read_text())["spent"] == pytest.approx(0.6)
    assert main(args + ["--epsilon", "0.6"]) == 2  # past the 1.0 budget: refused
