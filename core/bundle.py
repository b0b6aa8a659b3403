"""The bundle: everything a training run hands to serving, as plain files with checksums.

```
manifest.json          sha256 of every file below, towerline version, created_at
config.json            the full resolved TowerlineConfig of the run
vocab/                 users/items/event_types/attributes.json
retriever/config.json  network metadata (table sizes + TwoTowerConfig), enough to rebuild the net
retriever/weights.safetensors
item_embeddings.npy    (n_items, dim) float32 item-tower output, row = item vocabulary index
item_popularity.npy    (n_items,) int64 training interactions per item (popular fallback, logQ)
items.parquet          the catalogue (attributes, price, in_stock) for business rules
users.parquet          user_id, consent: users who said no get no personalisation when served
histories.npz          every user's time-ordered steps at training time (``Sequences`` arrays):
                       the starting point of the online history store and of "already seen" rules
metrics.json           final metrics of the run
ranker/config.json     optional: ranker metadata (Ranker.meta()), enough to rebuild it
ranker/weights.safetensors  ranker weights + its per-item facts (item vectors, categories, popularity)
```

Nothing in a bundle is unpickled: weights are safetensors, arrays are ``.npy`` read with
``allow_pickle=False``, the rest is JSON or Parquet. A bundle can come from a local directory, an
MLflow run (``runs:/<run_id>/bundle``) or the registry (``models:/<name>@<alias>`` or
``models:/<name>/<version>``); MLflow URIs are downloaded to a local cache first.

This module sits at the top of the package (not in ``training/`` or ``serving/``) because both
sides use it: training writes bundles, serving and ``towerline evaluate`` read them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerline import __version__
from towerline.errors import BundleError
from towerline.features.sequences import Sequences
from towerline.features.vocab import Vocabs

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REQUIRED_FILES = (
    "config.json",
    "retriever/config.json",
    "retriever/weights.safetensors",
    "item_embeddings.npy",
    "vocab/items.json",
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checksum every file in the bundle (except the manifest itself) into ``manifest.json``."""
    d = Path(directory)
    files = {
        str(p.relative_to(d)): sha256_file(p)
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.parent.name != "index"  # the index keeps its own manifest
    }
    manifest = {
        "format": "towerline-bundle/1",
        "towerline_version": __version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        **(extra or {}),
    }
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Refuse a bundle with missing files or files whose sha256 differs from the manifest."""
    d = Path(directory)
    if not d.is_dir():
        raise BundleError(f"bundle directory not found: {d}")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{d} is not a Towerline bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
    for required in REQUIRED_FILES:
        if required not in files:
            raise BundleError(f"bundle {d} lacks {required}")
    for rel, digest in files.items():
        p = d / rel
        if not p.is_file():
            raise BundleError(f"bundle {d}: {rel} is listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise BundleError(
                f"bundle {d}: {rel} fails its checksum (sha256 differs from {MANIFEST}); the file is "
                "corrupt or was changed after training — re-download or retrain"
            )
    return manifest


@dataclass
class Bundle:
    """A loaded bundle: the rebuilt retriever in eval mode plus what serving needs beside it."""

    path: Path
    uri: str
    config: dict[str, Any]
    vocabs: Vocabs
    net: Any  # towerline.training.model.TwoTowerNet
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
    ranker: Any = None  # towerline.training.ranker_model.Ranker in eval mode, None without ranker/
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    @property
    def max_len(self) -> int:
        return int(self.net_meta["cfg"]["max_len"])


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def resolve_bundle_uri(uri: str, cache_dir: str | Path | None = None) -> tuple[Path, dict[str, str | None]]:
    """Local directory for ``uri`` (downloading MLflow artifacts) and what the registry says of it."""
    info: dict[str, str | None] = {"model_name": None, "model_version": None, "model_alias": None}
    if not (uri.startswith("runs:/") or uri.startswith("models:/")):
        p = Path(uri)
        if not p.exists():
            raise BundleError(f"model not found: {uri} is neither a bundle directory nor an MLflow runs:/ or models:/ URI")
        return p, info

    import mlflow
    from mlflow.exceptions import MlflowException

    source = uri
    m = _MODELS_URI.match(uri)
    if uri.startswith("models:/"):
        if not m:
            raise BundleError(f"malformed model URI {uri!r}; use models:/<name>@<alias> or models:/<name>/<version>")
        client = mlflow.MlflowClient()
        try:
            if m["alias"]:
                mv = client.get_model_version_by_alias(m["name"], m["alias"])
            else:
                mv = client.get_model_version(m["name"], m["version"])
        except MlflowException as e:
            raise BundleError(f"{uri}: not in the model registry at {mlflow.get_tracking_uri()} ({e.message})") from None
        info = {"model_name": mv.name, "model_version": str(mv.version), "model_alias": m["alias"]}
        source = mv.source
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="towerline-bundle-"))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst))
    except MlflowException as e:
        raise BundleError(f"{uri}: could not download the bundle ({e.message})") from None
    return Path(local), info


def check_model(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Resolve ``uri`` and verify its manifest and checksums, without loading the network; returns
    the local bundle directory.

    Commands that start Ray or other long work (``serve``, ``index``, ``evaluate``) call this first,
    so a wrong ``--model`` ends at once in one ``BundleError`` line instead of a traceback from a
    replica twenty seconds later. The message is one line even when MLflow's is several.
    """
    try:
        path, _info = resolve_bundle_uri(str(uri), cache_dir)
        if not (path / MANIFEST).is_file() and (path / "bundle" / MANIFEST).is_file():
            raise BundleError(f"{path} is not a Towerline bundle ({MANIFEST} is missing); did you mean {path / 'bundle'}?")
        verify_bundle(path)
    except BundleError as e:
        raise BundleError(" ".join(str(e).split())) from None
    return path


def load_bundle(uri: str | Path, cache_dir: str | Path | None = None) -> Bundle:
    """Load and verify a bundle; the network is rebuilt from JSON + safetensors, never unpickled."""
    from safetensors.torch import load_file

    from towerline.training.model import build_two_tower

    path, info = resolve_bundle_uri(str(uri), cache_dir)
    manifest = verify_bundle(path)
    config = json.loads((path / "config.json").read_text())
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
        **info,
    )


def _load_ranker(path: Path) -> Any:
    """The ranker of ``ranker/`` (config.json + weights.safetensors), rebuilt in eval mode."""
    from safetensors.torch import load_file

    from towerline.training.ranker_model import build_ranker

    ranker = build_ranker(json.loads((path / "ranker" / "config.json").read_text()))
    weights = path / "ranker" / "weights.safetensors"
    if not weights.is_file():
        raise BundleError(f"{path}: ranker/config.json is present but ranker/weights.safetensors is missing")
    try:
        ranker.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise BundleError(f"{path}: ranker weights do not fit ranker/config.json ({e})") from None
    return ranker.eval()
