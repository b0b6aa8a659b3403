"""``towerline profile | audience | experiment`` end to end through the CLI entry point."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from towerline.cli import main


@pytest.fixture
def tracked(tiny_run, monkeypatch, tmp_path):
    """Commands run in tmp_path against the tiny run's MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_run.tracking_uri)
    yield tiny_run
    import mlflow

    mlflow.set_tracking_uri(None)


def test_profile_writes_parquet_and_report_and_logs_them_to_the_model_run(tracked, tmp_path, capsys):
    import mlflow

    out = tmp_path / "prof" / "profiles.parquet"
    assert main(["profile", "--model", str(tracked.bundle_dir), "--out", str(out), "--clusters", "3"]) == 0
    profiles = pd.read_parquet(out)
    assert profiles["consent"].all()  # users without consent are not exported
    assert {"rfm_group", "segment", "tags", "cluster"} <= set(profiles.columns)
    assert profiles["cluster"].between(0, 2).all()
    # the churn and LTV models, trained in the job on a time split of the same events, score every customer
    customers = profiles["frequency"] >= 1
    churn, ltv = profiles["churn_probability"], profiles["predicted_ltv"]
    assert churn[customers].between(0, 1).all() and (ltv[customers] >= 0).all()
    assert churn[~customers].isna().all() and ltv[~customers].isna().all()
    recent = customers & (profiles["recency_days"] <= 14)
    lapsed = customers & (profiles["recency_days"] >= 60)
    assert recent.sum() >= 5 and lapsed.sum() >= 5
    assert churn[recent].mean() < churn[lapsed].mean() and ltv[recent].mean() > 2 * ltv[lapsed].mean()
    from towerline.marketing.profiles import load_profiles, profile_of  # what GET /users/{id}/profile answers

    user = profiles.loc[customers, "user_id"].iloc[0]
    shown = profile_of(load_profiles(out), user)
    assert shown.churn_probability == pytest.approx(churn[customers].iloc[0])
    assert shown.predicted_ltv == pytest.approx(ltv[customers].iloc[0])
    assert (out.parent / "report.html").exists()
    assert "cluster 0:" in capsys.readouterr().out
    mlflow.set_tracking_uri(tracked.tracking_uri)
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(tracked.run_id, "profiles")}
    assert {"profiles/profiles.parquet", "profiles/report.html"} <= logged


def test_audience_writes_csv_without_past_buyers(tracked, tmp_path):
    from towerline.training.bundle import load_bundle

    bundle = load_bundle(tracked.bundle_dir)
    h = bundle.histories
    purchase = bundle.vocabs.event_types.encode_one("purchase")
    bought = h.event_type_idx == purchase
    item_idx = int(pd.Series(h.item_idx[bought]).value_counts().index[0])  # the most bought item
    rows = pd.Series(range(len(h))).repeat(h.lengths).to_numpy()
    buyers = set(bundle.vocabs.users.decode(h.user_idx[rows[bought & (h.item_idx == item_idx)]]))
    item = str(bundle.vocabs.items.decode([item_idx])[0])

    out = tmp_path / "audience.csv"
    assert main(["audience", "--model", str(tracked.bundle_dir), "--item", item, "--size", "1000", "--out", str(out)]) == 0
    audience = pd.read_csv(out, dtype={"user_id": str})
    assert list(audience.columns[:2]) == ["user_id", "score"]
    assert len(audience) > 0 and not buyers & set(audience["user_id"])

    profiles = tmp_path / "p" / "profiles.parquet"
    assert main(["profile", "--model", str(tracked.bundle_dir), "--out", str(profiles), "--no-mlflow"]) == 0
    seg = pd.read_parquet(profiles)["segment"].value_counts().index[0]
    out2 = tmp_path / "seg.csv"
    assert main(["audience", "--model", str(tracked.bundle_dir), "--item", item, "--size", "5", "--segment", seg,
                 "--profiles", str(profiles), "--out", str(out2)]) == 0
    assert set(pd.read_csv(out2)["segment"]) == {seg}


def test_audience_for_an_unknown_item_is_a_clear_error(tracked, tmp_path, capsys):
    rc = main(["audience", "--model", str(tracked.bundle_dir), "--item", "nope", "--out", str(tmp_path / "a.csv")])
    assert rc == 2
    assert "not in the model's catalogue" in capsys.readouterr().err


EXPERIMENTS = """
experiments:
  - name: home-feed
    control: control
    arms:
      - {name: control, share: 0.5}
      - {name: challenger, share: 0.5}
"""


def test_experiment_simulate_then_report(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENTS)
    db = tmp_path / "feedback.db"
    assert main(["experiment", "simulate", "home-feed", "--config", str(cfg), "--users", "3000", "--db", str(db),
                 "--rate", "control=0.05,0.03,40", "--rate", "challenger=0.09,0.03,40", "--bootstrap", "200"]) == 0
    assert "lift of challenger over control" in capsys.readouterr().out
    assert main(["experiment", "report", "home-feed", "--config", str(cfg), "--db", str(db), "--out", str(tmp_path / "r"),
                 "--bootstrap", "200"]) == 0
    report = json.loads((tmp_path / "r" / "home-feed.json").read_text())
    assert set(report["arms"]) == {"control", "challenger"}
    assert report["arms"]["challenger"]["lift"]["ctr"]["relative"]["ci"][0] > 0
    assert (tmp_path / "r" / "home-feed.html").exists()


def test_experiment_report_names_unknown_experiments_and_missing_stores(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENTS)
    assert main(["experiment", "report", "other", "--config", str(cfg)]) == 2
    assert "known experiments: home-feed" in capsys.readouterr().err
    assert main(["experiment", "report", "home-feed", "--config", str(cfg), "--db", str(tmp_path / "none.db")]) == 2
    assert "feedback store not found" in capsys.readouterr().err


def test_marketing_commands_have_help_with_examples(capsys):
    for argv in (["profile", "--help"], ["audience", "--help"], ["experiment", "report", "--help"],
                 ["experiment", "simulate", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "example:" in capsys.readouterr().out
