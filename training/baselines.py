"""Baselines every model must beat, scored with the same full-ranking protocol and metric keys.

A two-tower model's NDCG means little alone: the runs table in MLflow should show the lift over
what a shop gets for free. Two baselines, both fitted on ``Split.train`` only (the same training
prefixes the retriever sees) and evaluated exactly like the retriever (``evaluate_scores``:
full catalogue, history masked under ``<prefix>/`` and unmasked under ``<prefix>_unmasked/``):

* ``popularity``: every user gets the items with the most training interactions. Cheap, and on
  e-commerce data with a heavy head it is a strong rival for HR@K.
* ``item-knn``: item-based collaborative filtering (Sarwar et al., "Item-based collaborative
  filtering recommendation algorithms", WWW 2001; Deshpande & Karypis, TOIS 2004). Items are
  similar when the same users interacted with both: cosine similarity of the items' binary user
  columns, each item keeping its ``neighbours`` most similar items. A user's score for item ``j``
  is the similarity of ``j`` to the items of their history, weighted toward recent steps
  (``recency_decay`` per step back), so it also sees order, the signal sequential models exploit.

Both are a few sparse matrix products (scipy), seconds on Amazon Beauty.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
import scipy.sparse as sp
import torch
from towerline.config import TowerlineConfig, flatten, to_dict
from towerline.errors import ConfigError
from towerline.features.sequences import Sequences
from towerline.features.splits import EvalTargets
from towerline.features.vocab import N_RESERVED
from towerline.training.data import SequenceDataModule
from towerline.training.metrics import (
    RankingAccumulator,
    mask_scores,
    target_ranks,
    top_k_items,
)
from towerline.training.ranker_model import item_categories
from towerline.training.tracking import code_version, use_tracking

log = logging.getLogger(__name__)

BaselineKind = Literal["popularity", "item-knn"]
BASELINE_KINDS: tuple[str, ...] = ("popularity", "item-knn")


@dataclass(frozen=True)
class Baseline:
    """A fitted baseline: ``scores(full, targets, rows)`` gives (B, V) scores for evaluated users."""

    kind: BaselineKind
    n_items: int  # item table size, reserved rows included
    popularity: np.ndarray  # (V,) float64 training interactions per item
    similarity: sp.csr_matrix | None = None  # (V, V) item-item similarities (item-knn only)
    recency_decay: float = 0.9

    def scores(self, full: Sequences, targets: EvalTargets, rows: np.ndarray) -> torch.Tensor:
        """(B, V) float32 scores for evaluated users ``rows`` (positions into ``targets``)."""
        if self.kind == "popularity":
            base = torch.from_numpy(self.popularity.astype(np.float32))  # (V,)
            return base.expand(len(rows), -1).clone()
        histories = history_matrix(full, targets, rows, self.n_items, self.recency_decay)  # (B, V) sparse
        dense = (histories @ self.similarity).toarray().astype(np.float32)  # (B, V)
        # users whose history shares no user with any item still get an order: popularity breaks ties
        dense += 1e-6 * (self.popularity / max(self.popularity.max(), 1.0)).astype(np.float32)
        return torch.from_numpy(dense)


def fit_baseline(
    kind: BaselineKind, train: Sequences, n_items: int, neighbours: int = 100, recency_decay: float = 0.9
) -> Baseline:
    """Fit ``kind`` on the training prefixes ``train`` (``n_items`` counts the reserved rows)."""
    if kind not in BASELINE_KINDS:
        raise ConfigError(f"baseline kind {kind!r} is not one of {list(BASELINE_KINDS)}")
    popularity = np.bincount(train.item_idx, minlength=n_items).astype(np.float64)
    popularity[:N_RESERVED] = 0.0
    if kind == "popularity":
        return Baseline(kind, n_items, popularity)
    return Baseline(kind, n_items, popularity, item_similarity(train, n_items, neighbours), recency_decay)


def item_similarity(train: Sequences, n_items: int, neighbours: int) -> sp.csr_matrix:
    """(V, V) cosine similarity of items' binary user columns, top ``neighbours`` per row, no self."""
    n_users = len(train)
    user_of = np.repeat(np.arange(n_users), np.diff(train.offsets))  # (E,)
    x = sp.csr_matrix((np.ones(len(user_of), dtype=np.float32), (user_of, train.item_idx)), shape=(n_users, n_items))
    x.data[:] = 1.0  # binary: a user who bought an item twice is one co-occurrence (csr sums duplicates)
    x.sum_duplicates()
    x.data[:] = 1.0
    co = (x.T @ x).tocsr()  # (V, V) users in common
    co.setdiag(0.0)
    co.eliminate_zeros()
    norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel())  # (V,)
    norm[norm == 0] = 1.0
    co = sp.diags(1.0 / norm) @ co @ sp.diags(1.0 / norm)
    return _top_per_row(co.tocsr(), neighbours)


def _top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of each row."""
    rows, cols, vals = [], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        if hi == lo:
            continue
        data, idx = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > k:
            keep = np.argpartition(-data, k)[:k]
            data, idx = data[keep], idx[keep]
        rows.append(np.full(len(idx), r))
        cols.append(idx)
        vals.append(data)
    if not rows:
        return sp.csr_matrix(m.shape, dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape)


def history_matrix(full: Sequences, targets: EvalTargets, rows: np.ndarray, n_items: int, decay: float) -> sp.csr_matrix:
    """(B, V) sparse: weight ``decay ** steps_back`` of each history item (the newest weighs 1)."""
    r_idx, c_idx, w = [], [], []
    for b, t in enumerate(np.asarray(rows)):
        lo, hi = int(full.offsets[targets.rows[t]]), int(targets.history_end[t])
        items = full.item_idx[lo:hi]
        back = np.arange(len(items) - 1, -1, -1, dtype=np.float64)
        r_idx.append(np.full(len(items), b))
        c_idx.append(items)
        w.append(decay**back)
    if not r_idx:
        return sp.csr_matrix((len(rows), n_items), dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(w).astype(np.float32), (np.concatenate(r_idx), np.concatenate(c_idx))), shape=(len(rows), n_items)
    )


def evaluate_scores(
    baseline: Baseline,
    full: Sequences,
    targets: EvalTargets,
    prefix: str,
    batch_size: int = 512,
    item_category: np.ndarray | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of ``baseline`` with the retriever's protocol and keys (``<prefix>/ndcg_10``, ...)."""
    accs: dict[str, RankingAccumulator] = {}
    for lo in range(0, len(targets.targets), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(targets.targets)))
        scores = baseline.scores(full, targets, rows)  # (B, V)
        target = torch.from_numpy(targets.targets[rows].astype(np.int64))
        history = [
            torch.from_numpy(full.item_idx[int(full.offsets[targets.rows[t]]) : int(targets.history_end[t])].astype(np.int64))
            for t in rows
        ]
        for masked, name in ((True, prefix), (False, f"{prefix}_unmasked")):
            ranks = target_ranks(scores, target, history, mask_history=masked)
            topk = top_k_items(mask_scores(scores, history) if masked else scores, 10)
            accs.setdefault(name, beyond_accuracy_accumulator(baseline.popularity, item_category)).update(ranks, topk)
    return {f"{name}/{k}": float(v) for name, acc in accs.items() for k, v in acc.compute(n_items=baseline.n_items).items()}


def beyond_accuracy_accumulator(popularity: np.ndarray, item_category: np.ndarray | None) -> RankingAccumulator:
    """A ``RankingAccumulator`` that also reports novelty and intra-list diversity of the top 10."""
    return RankingAccumulator(item_popularity=torch.from_numpy(np.asarray(popularity, dtype=np.float64)),
                              item_category=None if item_category is None else torch.from_numpy(np.asarray(item_category, dtype=np.int64)))


@dataclass
class BaselineResult:
    kind: str
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    seconds: float


def run_baseline(
    cfg: TowerlineConfig, kind: BaselineKind, out_dir: str | Path = "runs/baseline", neighbours: int = 100
) -> BaselineResult:
    """Fit ``kind`` on the config's data and log a run beside the models' in the same MLflow experiment.

    The run carries the same params (``config/...``), tags (``dataset``, ``split``) and metric keys
    (``valid/ndcg_10``, ``test/ndcg_10``, ``test_unmasked/...``, coverage, novelty, diversity) as a
    training run, plus ``model_kind=baseline:<kind>``, so the runs table compares them column by column.
    """
    start = time.perf_counter()
    dm = SequenceDataModule(cfg, Path(out_dir) / "data")
    dm.prepare_data()
    dm.setup()
    n_items = len(dm.vocabs.items)
    category = item_categories(dm.item_attributes, dm.vocabs.attributes)
    baseline = fit_baseline(kind, dm.split.train, n_items, neighbours=neighbours)
    batch = cfg.trainer.eval_batch_size
    metrics = evaluate_scores(baseline, dm.split.full, dm.split.valid, "valid", batch, category)
    metrics.update(evaluate_scores(baseline, dm.split.full, dm.split.test, "test", batch, category))
    seconds = time.perf_counter() - start
    metrics["train/seconds"] = seconds

    uri = use_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = client.create_run(exp_id, run_name=f"{cfg.data.name}-baseline-{kind}-{stamp}", tags={
        "dataset": cfg.data.name, "split": cfg.data.split, "model_kind": f"baseline:{kind}", "code_version": code_version(),
    })
    run_id = run.info.run_id
    params = {"config/" + k.replace(".", "/"): str(v) for k, v in flatten(to_dict(cfg)).items()}
    params.update({"baseline/kind": kind, "baseline/neighbours": str(neighbours) if kind == "item-knn" else "-"})
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()],
                     metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()])
    client.set_terminated(run_id)
    log.info("baseline %s: test NDCG@10 %.4f (MLflow run %s)", kind, metrics.get("test/ndcg_10", float("nan")), run_id)
    return BaselineResult(kind, run_id, uri, metrics, seconds)
