"""Full-catalogue evaluation shared by the Lightning system and ``towerline evaluate``.

Every item is scored for every evaluated user; metrics come twice, with the user's history masked
(the published leave-one-out protocol) under ``<prefix>/`` and unmasked under ``<prefix>_unmasked/``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from towerline.features.sequences import Sequences
from towerline.features.splits import EvalTargets
from towerline.training.data import EvalUsers, collate_eval, trim_left_padding
from towerline.training.metrics import RankingAccumulator, mask_scores, target_ranks, top_k_items
from towerline.training.model import TwoTowerNet

log = logging.getLogger(__name__)


def accumulate_batch(
    accs: dict[str, RankingAccumulator], net: TwoTowerNet, item_table: torch.Tensor, batch: dict[str, torch.Tensor], prefix: str
) -> None:
    """Score one batch of users against the whole catalogue and add its ranks to ``accs``."""
    items, types = trim_left_padding(batch["items"], batch["types"])  # (B, T')
    users = net.user_vector(items, types, item_table=item_table)  # (B, D)
    scores = users @ item_table.T  # (B, V)
    for masked, name in ((True, prefix), (False, f"{prefix}_unmasked")):
        ranks = target_ranks(scores, batch["target"], batch["history"], mask_history=masked)
        topk = top_k_items(mask_scores(scores, batch["history"]) if masked else scores, 10)
        accs.setdefault(name, RankingAccumulator()).update(ranks, topk)


def summarise(accs: dict[str, RankingAccumulator], n_items: int) -> dict[str, float]:
    """``{"test/ndcg_10": ..., "test_unmasked/hr_10": ...}``; ``n_items`` counts the reserved rows."""
    return {f"{name}/{k}": float(v) for name, acc in accs.items() for k, v in acc.compute(n_items=n_items).items()}


@torch.no_grad()
def evaluate_targets(
    net: TwoTowerNet, full: Sequences, targets: EvalTargets, prefix: str = "test", batch_size: int = 256, progress: bool = True
) -> dict[str, Any]:
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    loader = DataLoader(EvalUsers(full, targets, net.cfg.max_len), batch_size=batch_size, collate_fn=collate_eval)
    table = net.item_vectors()
    accs: dict[str, RankingAccumulator] = {}
    for batch in tqdm(loader, desc=f"evaluate {prefix}", disable=not progress, leave=False):
        accumulate_batch(accs, net, table, {k: v.to(device) for k, v in batch.items()}, prefix)
    net.train(was_training)
    return summarise(accs, net.n_items)


def evaluate_bundle(
    uri: str, data_overrides: list[str] | None = None, batch_size: int = 256, progress: bool = True
) -> dict[str, Any]:
    """Re-evaluate a bundle (dir, runs:/..., models:/...) on its data set or on ``--set data.*`` overrides.

    The data are encoded with the bundle's own vocabularies: items the model never saw become the
    unknown index, so they count as misses instead of being silently dropped.
    """
    from towerline.bundle import load_bundle
    from towerline.config import TowerlineConfig, apply_overrides, from_dict
    from towerline.features.sequences import build_sequences
    from towerline.training.data import load_data, make_split

    bundle = load_bundle(uri)
    cfg = from_dict(TowerlineConfig, apply_overrides(bundle.config, data_overrides or []))
    dataset = load_data(cfg.data)
    split = make_split(build_sequences(dataset.events, bundle.vocabs), cfg.data)
    metrics = evaluate_targets(bundle.net, split.full, split.test, "test", batch_size, progress)
    metrics.update(evaluate_targets(bundle.net, split.full, split.valid, "valid", batch_size, progress))
    return {"model": uri, "model_version": bundle.model_version, "dataset": cfg.data.name, "metrics": metrics}
