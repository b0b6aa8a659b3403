"""Differentially private releases: the noise matches epsilon, and the ledger refuses to overspend."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("opendp", reason="OpenDP is in the 'campaigns' and 'test' extras")

from towerline.errors import ConfigError  # noqa: E402
from towerline.marketing.privacy import (  # noqa: E402
    PrivacyBudgetError,
    PrivacyLedger,
    laplace_counts,
    laplace_sums,
    release_results_by_segment,
    release_segment_sizes,
)


def test_count_noise_scale_matches_epsilon():
    # Laplace(b = 1/eps): E|noise| = b and Var = 2 b^2 (the discrete version differs by < 0.1% at b = 10).
    for eps in (0.1, 0.5):
        b = 1.0 / eps
        noise = laplace_counts(np.full(4000, 1000), eps) - 1000
        assert abs(noise.mean()) < 4 * np.sqrt(2) * b / np.sqrt(4000)
        assert np.mean(np.abs(noise)) == pytest.approx(b, rel=0.08), eps
        assert noise.var() == pytest.approx(2 * b * b, rel=0.15), eps


def test_sum_noise_scales_with_the_cap():
    noise = laplace_sums(np.zeros(4000), epsilon=1.0, cap=50.0)
    assert np.mean(np.abs(noise)) == pytest.approx(50.0, rel=0.08)


def test_budget_is_enforced_and_recorded(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, budget=0.5)
    profiles = pd.DataFrame({"user_id": [f"u{i}" for i in range(300)], "segment": ["new", "active", "churned"] * 100,
                             "consent": True})
    release_segment_sizes(profiles, 0.2, ledger)
    release_segment_sizes(profiles, 0.2, ledger, name="again")
    with pytest.raises(PrivacyBudgetError, match=r"budget of .* is epsilon = 0.5, of which 0.4 is spent"):
        release_segment_sizes(profiles, 0.2, ledger)
    reopened = PrivacyLedger(path)  # the ledger survives restarts: spending is not reset
    assert reopened.spent == pytest.approx(0.4) and [r.name for r in reopened.releases] == ["segment sizes", "again"]
    with pytest.raises(PrivacyBudgetError):
        release_segment_sizes(profiles, 0.11, reopened)
    release_segment_sizes(profiles, 0.1, reopened)  # exactly the rest is allowed
    assert json.loads(path.read_text())["spent"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="refusing to change it"):
        PrivacyLedger(path, budget=10.0)


def test_results_by_segment_release_only_noisy_aggregates(tmp_path):
    rng = np.random.default_rng(0)
    n = 4000
    outcomes = pd.DataFrame({"user_id": [f"user-{i}" for i in range(n)], "segment": rng.choice(["new", "loyal"], n),
                             "holdout": rng.random(n) < 0.2, "converted": rng.random(n) < 0.1,
                             "revenue": rng.gamma(2, 30, n)})
    outcomes.loc[~outcomes["converted"], "revenue"] = 0.0
    ledger = PrivacyLedger(tmp_path / "l.json", budget=3.0)
    out = release_results_by_segment(outcomes, 3.0, ledger, revenue_cap=200.0)
    assert list(out.columns) == ["segment", "holdout", "users", "conversions", "revenue", "conversion_rate"]
    assert len(out) == 4 and not out.astype(str).apply(lambda c: c.str.contains("user-")).any().any()
    truth = outcomes.groupby(["segment", "holdout"]).size().to_numpy()
    assert np.all(np.abs(out["users"].to_numpy() - truth) < 30)  # scale 1/(3/3) = 1: noise of a few users
    assert ledger.remaining == pytest.approx(0.0)


def test_every_defined_segment_is_released_even_when_empty(tmp_path):
    profiles = pd.DataFrame({"user_id": ["a", "b"], "segment": ["new", "new"], "consent": [True, False]})
    out = release_segment_sizes(profiles, 1.0, PrivacyLedger(tmp_path / "l.json", budget=1.0))
    assert out["segment"].tolist() == ["new", "active", "loyal", "at-risk", "churned", "unknown"]
    assert (out["users"] >= 0).all()
