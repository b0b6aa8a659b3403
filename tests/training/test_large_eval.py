"""Exact FAISS top-k evaluation agrees with the dense full-ranking evaluation it replaces at scale."""

from __future__ import annotations

import pytest

from towerline.training.bundle import load_bundle
from towerline.training.data import load_data, make_split
from towerline.training.evaluate import evaluate_targets
from towerline.training.large_eval import evaluate_with_faiss
from towerline.features.sequences import build_sequences


def test_faiss_metrics_equal_dense_full_ranking(tiny_run):
    bundle = load_bundle(tiny_run.bundle_dir)
    cfg = bundle.config
    split = make_split(build_sequences(load_data(cfg.data).events, bundle.vocabs), cfg.data)
    dense = evaluate_targets(bundle.net, split.full, split.test, "test", progress=False)
    faiss_metrics = evaluate_with_faiss(bundle.net, split.full, split.test, "test", batch_size=37)
    for key in ("test/hr_5", "test/ndcg_10", "test/hr_20", "test_unmasked/ndcg_10", "test_unmasked/hr_10", "test/coverage_10"):
        assert faiss_metrics[key] == pytest.approx(dense[key], abs=2e-3), key  # float ties may order apart
    assert faiss_metrics["test/users"] == len(split.test)
    sample = evaluate_with_faiss(bundle.net, split.full, split.test, "test", max_users=50)
    assert sample["test/users"] == 50
