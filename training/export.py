"""Write a trained system as a bundle directory (layout in ``towerline.bundle``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from towerline.bundle import write_manifest
from towerline.config import TowerlineConfig, to_dict
from towerline.features.sequences import Sequences
from towerline.features.vocab import Vocabs
from towerline.training.cold_items import fit_from_net
from towerline.training.model import TwoTowerNet

log = logging.getLogger(__name__)


@torch.no_grad()
def item_embeddings(net: TwoTowerNet) -> np.ndarray:
    """(n_items, D) float32 item-tower output in eval mode: the vectors FAISS indexes."""
    was_training = net.training
    net.eval()
    emb = net.item_vectors().float().cpu().numpy()
    net.train(was_training)
    return np.ascontiguousarray(emb, dtype=np.float32)


def export_bundle(
    net: TwoTowerNet,
    vocabs: Vocabs,
    cfg: TowerlineConfig,
    directory: str | Path,
    *,
    items: pd.DataFrame | None = None,
    item_popularity: np.ndarray | None = None,
    histories: Sequences | None = None,
    users: pd.DataFrame | None = None,
    metrics: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    d = Path(directory)
    if d.exists():
        shutil.rmtree(d)
    (d / "retriever").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    vocabs.save(d / "vocab")
    (d / "retriever" / "config.json").write_text(json.dumps(net.meta(), indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(d / "retriever" / "weights.safetensors"))
    emb = item_embeddings(net)
    np.save(d / "item_embeddings.npy", emb, allow_pickle=False)
    if cfg.model.cold_item_mapper and item_popularity is not None:
        mapper = fit_from_net(net, emb, np.asarray(item_popularity))  # model.cold_item_l2, _weighting
        if mapper is not None:  # None: no attributes, or no warm item to fit on; cold items take the tower's path
            mapper.save(d)
    if item_popularity is not None:
        np.save(d / "item_popularity.npy", np.asarray(item_popularity, dtype=np.int64), allow_pickle=False)
    if items is not None:
        items.to_parquet(d / "items.parquet")
    if histories is not None:
        histories.save(d / "histories.npz")
    if users is not None:
        users.to_parquet(d / "users.parquet")
    (d / "metrics.json").write_text(json.dumps(metrics or {}, indent=2, sort_keys=True))
    for name, src in (extra_files or {}).items():
        if Path(src).exists():
            shutil.copy(src, d / name)
    write_manifest(d, manifest_extra)
    log.info("bundle written to %s", d)
    return d
