"""The bundle: everything a training run hands to serving, as plain files with checksums.

```
manifest.json          sha256 of every file below, towerline version, created_at
config.json            the full resolved TowerlineConfig of the run
vocab/                 users/items/event_types/attributes.json
retriever/config.json  network metadata (table sizes + TwoTowerConfig), enough to rebuild the net
retriever/weights.safetensors
retriever/cold_items.safetensors  optional: the fitted cold-start mapper (attribute bag -> item vector)
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

This module is the bundle *format* only (file layout, manifest, checksums, URI resolution), so it
sits in ``core/`` and imports none of the layers: training writes bundles with ``write_manifest``,
everyone verifies them with ``verify_bundle``. Assembling a loaded bundle (vocabularies, histories,
rebuilt networks) is ``towerline.training.bundle.load_bundle``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from towerline import __version__
from towerline.errors import BundleError

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
    return pyfunc_bundle_dir(Path(local)), info


def pyfunc_bundle_dir(path: Path) -> Path:
    """The bundle inside an MLflow pyfunc model directory (registered versions point at one:
    ``training/tracking.py``), or ``path`` itself when it is not a model directory (older versions
    registered the bundle folder directly, and ``runs:/<run>/bundle`` is the bundle)."""
    mlmodel = path / "MLmodel"
    if not mlmodel.is_file():
        return path
    import yaml

    try:
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        rel = flavor.get("artifacts", {}).get("bundle", {}).get("path", "artifacts/bundle")
    except (yaml.YAMLError, AttributeError) as e:
        raise BundleError(f"{mlmodel}: unreadable MLflow model file ({e})") from None
    inner = path / rel
    if not (inner / MANIFEST).is_file():
        raise BundleError(f"{path} is an MLflow model without a Towerline bundle artifact ({rel}/{MANIFEST} is missing)")
    return inner


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
