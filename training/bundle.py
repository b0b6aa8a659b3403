"""A loaded bundle: the format of ``towerline.bundle`` assembled into vocabularies, histories and networks.

``core/bundle.py`` knows the files (layout, manifest, sha256, where a URI points); this module
rebuilds what they describe, which needs the feature contracts and the network definitions, so it
lives in ``training/``. Serving, marketing and the CLI import ``load_bundle`` from here.

Nothing is unpickled: networks are rebuilt from JSON metadata plus safetensors weights, arrays are
``.npy``/``.npz`` read with ``allow_pickle=False``. ``Bundle.config`` is the typed
``TowerlineConfig`` of the run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors.torch import load_file

from towerline.bundle import resolve_bundle_uri, verify_bundle
from towerline.config import TowerlineConfig, from_dict
from towerline.errors import BundleError, ConfigError
from towerline.features.sequences import Sequences
from towerline.features.vocab import Vocabs
from towerline.training.cold_items import ColdItemMapper, load_mapper
from towerline.training.model import TwoTowerNet, build_two_tower
from towerline.training.ranker_model import Ranker, build_ranker

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    """A loaded bundle: the rebuilt retriever in eval mode plus what serving needs beside it."""

    path: Path
    uri: str
    config: TowerlineConfig
    vocabs: Vocabs
    net: TwoTowerNet
    net_meta: dict[str, Any]
    item_embeddings: np.ndarray  # (n_items, D) float32
    item_popularity: np.ndarray  # (n_items,) int64
    items: pd.DataFrame
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    model_name: str | None = None
    model_version: str | None = None
    model_alias: str | None = None
    histories: Sequences | None = None
    ranker: Ranker | None = None  # in eval mode; None without ranker/
    cold_items: ColdItemMapper | None = None  # retriever/cold_items.safetensors: cold items' vectors; None: the tower's path
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    @property
    def max_len(self) -> int:
        return int(self.net_meta["cfg"]["max_len"])


def load_bundle(uri: str | Path, cache_dir: str | Path | None = None) -> Bundle:
    """Load and verify a bundle; the network is rebuilt from JSON + safetensors, never unpickled."""
    path, info = resolve_bundle_uri(str(uri), cache_dir)
    manifest = verify_bundle(path)
    config = _typed_config(path)
    net_meta = json.loads((path / "retriever" / "config.json").read_text())
    net = build_two_tower(net_meta)
    state = load_file(str(path / "retriever" / "weights.safetensors"))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise BundleError(f"{path}: retriever weights do not fit retriever/config.json ({e})") from None
    net.eval()
    emb = np.load(path / "item_embeddings.npy", allow_pickle=False)
    pop_path = path / "item_popularity.npy"
    popularity = np.load(pop_path, allow_pickle=False) if pop_path.exists() else np.zeros(len(emb), dtype=np.int64)
    items_path = path / "items.parquet"
    items = pd.read_parquet(items_path) if items_path.exists() else pd.DataFrame({"item_id": []})
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    hist_path = path / "histories.npz"
    histories = Sequences.load(hist_path) if hist_path.exists() else None
    ranker = _load_ranker(path) if (path / "ranker" / "config.json").exists() else None
    info = {
        "model_name": info["model_name"] or manifest.get("model_name"),
        "model_version": info["model_version"] or manifest.get("model_version"),
        "model_alias": info["model_alias"],
    }
    return Bundle(
        path=path,
        uri=str(uri),
        config=config,
        vocabs=Vocabs.load(path / "vocab"),
        net=net,
        net_meta=net_meta,
        item_embeddings=emb,
        item_popularity=popularity,
        items=items,
        metrics=metrics,
        manifest=manifest,
        histories=histories,
        ranker=ranker,
        cold_items=load_mapper(path),
        **info,
    )


def _typed_config(path: Path) -> TowerlineConfig:
    """``config.json`` as the typed config; a bundle from an incompatible version is a ``BundleError``."""
    try:
        return from_dict(TowerlineConfig, json.loads((path / "config.json").read_text()))
    except (ConfigError, ValueError, TypeError) as e:
        raise BundleError(f"{path}/config.json is not a valid Towerline config ({e}); retrain with this version") from None


def _load_ranker(path: Path) -> Ranker:
    """The ranker of ``ranker/`` (config.json + weights.safetensors), rebuilt in eval mode."""
    ranker = build_ranker(json.loads((path / "ranker" / "config.json").read_text()))
    weights = path / "ranker" / "weights.safetensors"
    if not weights.is_file():
        raise BundleError(f"{path}: ranker/config.json is present but ranker/weights.safetensors is missing")
    try:
        ranker.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise BundleError(f"{path}: ranker weights do not fit ranker/config.json ({e})") from None
    return ranker.eval()
