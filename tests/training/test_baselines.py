"""Baselines on hand-made sequences whose answers are known, and a real run logged to MLflow."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from support import REPO, tiny_overrides
from towerline.config import load_config
from towerline.errors import ConfigError
from towerline.features.sequences import Sequences
from towerline.features.splits import EvalTargets
from towerline.training.baselines import evaluate_scores, fit_baseline, run_baseline
from towerline.training.metrics import RankingAccumulator

N_ITEMS = 2 + 12  # items 2..13 (a top-10 list needs at least 10)


def seqs(rows: list[list[int]]) -> Sequences:
    items = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    zeros = np.zeros(len(items), dtype=np.int64)
    return Sequences(user_idx=np.arange(2, 2 + len(rows), dtype=np.int64), offsets=offsets, item_idx=items,
                     event_type_idx=zeros + 2, timestamp=zeros, value=np.full(len(items), np.nan))


def last_item_targets(full: Sequences) -> EvalTargets:
    rows = np.arange(len(full))
    end = full.offsets[1:] - 1
    return EvalTargets(rows=rows, history_end=end, targets=full.item_idx[end])


def test_popularity_ranks_the_most_frequent_training_item_first():
    train = seqs([[2, 3], [2, 4], [2, 5], [3, 6]])
    base = fit_baseline("popularity", train, N_ITEMS)
    full = seqs([[4, 2], [6, 3]])  # targets 2 (most popular) and 3 (second)
    m = evaluate_scores(base, full, last_item_targets(full), "test")
    # user 0: item 2 is the top item (rank 0); user 1: item 3 ranks behind 2 -> rank 1
    assert m["test_unmasked/hr_5"] == 1.0
    assert m["test_unmasked/mrr"] == pytest.approx((1.0 + 0.5) / 2)


def test_item_knn_recommends_what_co_occurred_with_the_history():
    # 2 and 3 always go together, 4 and 5 together; 6 is the popular stranger
    train = seqs([[2, 3], [3, 2], [2, 3, 6], [4, 5], [5, 4, 6], [6], [6]])
    base = fit_baseline("item-knn", train, N_ITEMS, neighbours=10)
    full = seqs([[2, 3], [4, 5]])
    scores = base.scores(full, last_item_targets(full), np.arange(2))  # history of user 0 is [2], user 1 is [4]
    assert int(scores[0, 2:].argmax()) + 2 == 3
    assert int(scores[1, 2:].argmax()) + 2 == 5
    m = evaluate_scores(base, full, last_item_targets(full), "test")
    assert m["test/hr_5"] == 1.0 and m["test/ndcg_10"] == 1.0


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="item-knn"):
        fit_baseline("bpr", seqs([[2]]), N_ITEMS)  # type: ignore[arg-type]


def test_novelty_and_diversity_follow_their_definitions():
    popularity = torch.tensor([0, 0, 7, 1, 1, 1], dtype=torch.float64)  # 10 interactions over 4 real items
    category = torch.tensor([0, 0, 5, 5, 6, 7])
    acc = RankingAccumulator(coverage_k=2, item_popularity=popularity, item_category=category)
    acc.update(torch.tensor([0, 1]), torch.tensor([[2, 3], [4, 5]]))
    out = acc.compute(n_items=6)
    share = (popularity + 1) / (10 + 4)
    info = -torch.log2(share)
    assert out["novelty_2"] == pytest.approx(float((info[2] + info[3] + info[4] + info[5]) / 4))
    assert out["diversity_2"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # [2, 3] share category 5


def test_baseline_run_logs_the_model_metric_keys_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides(uri))
    result = run_baseline(cfg, "item-knn", tmp_path / "baseline")
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    for key in ("valid/ndcg_10", "test/ndcg_10", "test_unmasked/ndcg_10", "test/coverage_10", "test/novelty_10",
                "test/diversity_10"):
        assert key in run.data.metrics, key
    assert run.data.tags["model_kind"] == "baseline:item-knn" and run.data.tags["dataset"] == cfg.data.name
    assert run.info.experiment_id == mlflow.MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment).experiment_id
    assert 0.0 < run.data.metrics["test/hr_10"] <= 1.0
    mlflow.set_tracking_uri(None)
