"""Full-catalogue evaluation shared by the Lightning system and ``towerline evaluate``.

Every item is scored for every evaluated user; metrics come twice, with the user's history masked
(the published leave-one-out protocol) under ``<prefix>/`` and unmasked under ``<prefix>_unmasked/``.
Scores come from ``training/inference.py``, the functions serving calls, over fixed windows and one
score row per user: the metrics do not depend on ``trainer.eval_batch_size``.

``evaluate_pipeline`` is the same for retrieve -> rank: the candidate lists and ranker scores of
``inference`` (the served ones), ranked under the protocol (history masked, target kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from towerline.config import TowerlineConfig, apply_overrides, from_dict, to_dict
from towerline.features.sequences import Sequences, build_sequences
from towerline.features.splits import EvalTargets
from towerline.features.vocab import Vocab
from towerline.training import inference
from towerline.training.bundle import Bundle, load_bundle
from towerline.training.candidates import eval_positions, retrieve_candidates
from towerline.training.data import load_data, make_split
from towerline.training.metrics import RankingAccumulator, mask_scores, target_ranks, top_k_items
from towerline.training.model import TwoTowerNet
from towerline.training.ranker_model import item_categories
from towerline.training.ranker_train import pipeline_report, score_candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemFacts:
    """What the beyond-accuracy metrics read per item: novelty needs popularity, diversity categories."""

    popularity: torch.Tensor | None = None  # (V,) training interactions per item
    category: torch.Tensor | None = None  # (V,) long category index (PAD: none)

    def accumulator(self) -> RankingAccumulator:
        return RankingAccumulator(item_popularity=self.popularity, item_category=self.category)


def item_facts(net: TwoTowerNet, attributes: Vocab | None, popularity: np.ndarray | None) -> ItemFacts:
    """``ItemFacts`` of a net's catalogue: categories from its attribute table (``item_categories``)."""
    table = getattr(net.item_tower, "item_attributes", None)
    category = None
    if table is not None and attributes is not None:
        category = torch.from_numpy(item_categories(table.cpu().numpy(), attributes))
    pop = None if popularity is None else torch.as_tensor(np.asarray(popularity, dtype=np.float64))
    return ItemFacts(pop, category)


def accumulate_batch(
    accs: dict[str, RankingAccumulator], net: TwoTowerNet, item_table: torch.Tensor, batch: dict[str, torch.Tensor], prefix: str,
    facts: ItemFacts = ItemFacts(),
) -> None:
    """Score one batch of users against the whole catalogue and add its ranks to ``accs``.

    ``batch``: ``items``/``types``/``ts`` (B, T) left-padded windows, ``target`` (B,), ``history`` (B, H).
    ``facts``: with popularity and categories, ``novelty_10`` and ``diversity_10`` join ``coverage_10``.
    """
    users = inference.user_vectors(net, batch["items"], batch["types"], item_table, batch.get("ts"))  # (B, D)
    scores = inference.item_scores(users, item_table)  # (B, V)
    for masked, name in ((True, prefix), (False, f"{prefix}_unmasked")):
        ranks = target_ranks(scores, batch["target"], batch["history"], mask_history=masked)
        topk = top_k_items(mask_scores(scores, batch["history"]) if masked else scores, 10)
        accs.setdefault(name, facts.accumulator()).update(ranks, topk)


def summarise(accs: dict[str, RankingAccumulator], n_items: int) -> dict[str, float]:
    """``{"test/ndcg_10": ..., "test_unmasked/hr_10": ...}``; ``n_items`` counts the reserved rows."""
    return {f"{name}/{k}": float(v) for name, acc in accs.items() for k, v in acc.compute(n_items=n_items).items()}


@torch.no_grad()
def evaluate_targets(
    net: TwoTowerNet, full: Sequences, targets: EvalTargets, prefix: str = "test", batch_size: int = 256, progress: bool = True,
    facts: ItemFacts = ItemFacts(),
) -> dict[str, Any]:
    """Full-ranking metrics of ``targets`` (each user's history is ``full`` before the target)."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    table = net.item_vectors()  # (V, D)
    hist = inference.Histories.from_sequences(full, targets.rows, targets.history_end)
    target = np.asarray(targets.targets, dtype=np.int64)
    accs: dict[str, RankingAccumulator] = {}
    for lo in tqdm(range(0, len(hist), batch_size), desc=f"evaluate {prefix}", disable=not progress, leave=False):
        sub = hist.take(slice(lo, lo + batch_size))
        items, types, ts = sub.windows(net.cfg.max_len)
        batch = {"items": items, "types": types, "ts": ts, "target": target[lo : lo + batch_size], "history": sub.seen()}
        accumulate_batch(accs, net, table, {k: torch.from_numpy(v).to(device) for k, v in batch.items()}, prefix, facts)
    net.train(was_training)
    return summarise(accs, net.n_items)


def evaluate_pipeline(
    bundle: Bundle, full: Sequences, targets: EvalTargets, prefix: str = "test", batch_size: int = 256, progress: bool = False
) -> dict[str, float]:
    """Retrieve -> rank under the evaluation protocol: ``<prefix>/pipeline_ndcg_10`` and friends
    (``ranker_train.pipeline_report``), from the candidate lists and scores serving computes."""
    if bundle.ranker is None:
        raise ValueError(f"bundle {bundle.path} has no ranker/: train one with `towerline train-ranker`")
    n = inference.list_length(bundle.ranker)
    data = retrieve_candidates(bundle.net, full, eval_positions(full, targets), n, bundle.ranker.cfg.history_len,
                               batch_size, progress, f"{prefix} candidates")
    return pipeline_report(score_candidates(bundle.ranker, data), data, prefix, bundle.config.ranker.bootstrap_samples,
                           bundle.config.trainer.seed)


def bundle_split(bundle: Bundle, data_overrides: list[str] | None = None):
    """The config and split a bundle was evaluated on: its histories, or its data re-read with
    ``--set data.*`` overrides (encoded with the bundle's vocabularies: unseen items become UNK)."""
    cfg: TowerlineConfig = bundle.config
    if data_overrides:
        cfg = from_dict(TowerlineConfig, apply_overrides(to_dict(cfg), data_overrides))
    if bundle.histories is not None and not data_overrides:
        seqs = bundle.histories
    else:
        seqs = build_sequences(load_data(cfg.data).events, bundle.vocabs)
    return cfg, make_split(seqs, cfg.data)


def evaluate_bundle(
    uri: str, data_overrides: list[str] | None = None, batch_size: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Re-evaluate a bundle (dir, runs:/..., models:/...) on its data set or on ``--set data.*`` overrides.

    The data are encoded with the bundle's own vocabularies: items the model never saw become the
    unknown index, so they count as misses instead of being silently dropped. With a ranker in the
    bundle the retrieve -> rank pipeline is evaluated too (``test/pipeline_*``).
    """
    bundle = load_bundle(uri)
    cfg, split = bundle_split(bundle, data_overrides)
    bs = batch_size or cfg.trainer.eval_batch_size
    facts = item_facts(bundle.net, bundle.vocabs.attributes, bundle.item_popularity)
    metrics = evaluate_targets(bundle.net, split.full, split.test, "test", bs, progress, facts)
    metrics.update(evaluate_targets(bundle.net, split.full, split.valid, "valid", bs, progress, facts))
    if bundle.ranker is not None:
        metrics.update(evaluate_pipeline(bundle, split.full, split.test, "test", bs, progress))
    return {"model": uri, "model_version": bundle.model_version, "dataset": cfg.data.name, "metrics": metrics}
