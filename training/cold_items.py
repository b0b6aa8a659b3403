"""Cold-start item vectors fitted after training: attribute bag -> item vector, learnt from the warm items.

An item that arrives with attributes and no interactions needs a vector in the space the user tower
points into. The item tower's own attribute path (id part zeroed, ``ItemTower.attribute_vectors``)
is one answer, taught by id dropout (DropoutNet, Volkovs et al., NeurIPS 2017); but the longer the
id embeddings train, the further the trained item vectors drift from what the attribute half alone
gives, and the attribute-only vectors are short (no id part), so they lose to every warm item.

The ``ColdItemMapper`` is fitted once, after training, on the trained vectors of the warm items
(what serving actually indexes): a weighted ridge regression from the item's attribute bag (the mean
of its attribute tokens, the same pooling as the tower's ``EmbeddingBag``) to its trained vector,
with a bias (the average warm item) and the tower's attribute embeddings as the prior the ridge
shrinks toward (a token no warm item carries keeps the tower's embedding; an infinite penalty gives
back the tower's attribute path plus the average id part). Ridge shrinks predictions toward the mean, so the output is
rescaled to the warm items' weighted mean norm (``scale``). This is the "map content to the trained
collaborative space" recipe of Gantner et al. (ICDM 2010, attribute-to-feature mapping) on top of
DropoutNet training.

It lives in the bundle as ``retriever/cold_items.safetensors`` (weights + JSON-able metadata, no
pickle) and is used by the one cold-item path, ``inference.cold_item_vectors``, which
``recommender.add_items`` (``POST /admin/items``, catalogue reloads) and ``bench/cold_start.py``
call, so the served cold vectors are the benchmarked ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from towerline.errors import BundleError
from towerline.features.vocab import N_RESERVED, PAD_IDX

log = logging.getLogger(__name__)

MAPPER_FILE = "retriever/cold_items.safetensors"
Weighting = Literal["uniform", "log", "sqrt", "popularity"]


class NoWarmItems(ValueError):
    """Nothing to fit a mapper on: no item has both attributes and training interactions."""


@dataclass(frozen=True)
class ColdItemMapper:
    """Attribute rows -> item vectors: ``scale * (mean of weight[tokens] + bias)``; no tokens -> zero."""

    weight: torch.Tensor  # (n_attribute_rows, D) float32, row = attribute vocabulary index
    bias: torch.Tensor  # (D,) float32
    scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # how it was fitted (l2, weighting, items), for the record

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @torch.no_grad()
    def vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, A) long attribute indices, PAD-padded -> (N, D) float32 vectors.

        The same mean pooling as the item tower (``EmbeddingBag(mode="mean", padding_idx=PAD)``),
        so a row means what it means to the tower. A row without any token gets the zero vector,
        as on the tower's path: nothing places it, it scores 0 against every user.
        """
        if rows.dim() != 2:
            raise ValueError(f"rows must be (N, A) attribute indices, got shape {tuple(rows.shape)}")
        rows = rows.long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.weight.shape[0]):
            raise ValueError(f"attribute indices outside [0, {self.weight.shape[0]}) for this mapper")
        pooled = F.embedding_bag(rows, self.weight, mode="mean", padding_idx=PAD_IDX)  # (N, D)
        has = (rows != PAD_IDX).any(dim=1, keepdim=True)  # (N, 1)
        return torch.where(has, self.scale * (pooled + self.bias), torch.zeros_like(pooled))

    def save(self, bundle_dir: str | Path) -> Path:
        """Write ``retriever/cold_items.safetensors`` into a bundle directory (before its manifest)."""
        path = Path(bundle_dir) / MAPPER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"scale": repr(float(self.scale)), "meta": json.dumps(self.meta, sort_keys=True)}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)
        return path


def load_mapper(bundle_dir: str | Path) -> ColdItemMapper | None:
    """The bundle's fitted mapper, or None when it has none (cold items then take the tower's path)."""
    path = Path(bundle_dir) / MAPPER_FILE
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        return ColdItemMapper(weight=tensors["weight"].float(), bias=tensors["bias"].float(),
                              scale=float(meta.get("scale", "1.0")), meta=json.loads(meta.get("meta", "{}")))
    except (KeyError, ValueError, OSError) as e:
        raise BundleError(f"{path}: not a cold-item mapper ({e})") from None


def _mean_bag(rows: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """(N, A) PAD-padded attribute indices -> (N, n_cols) sparse mean-bag matrix (rows sum to 1 or 0)."""
    n, a = rows.shape
    r = np.repeat(np.arange(n), a)
    c = rows.reshape(-1)
    keep = c != PAD_IDX
    counts = np.maximum((rows != PAD_IDX).sum(axis=1), 1).astype(np.float64)  # (N,)
    vals = 1.0 / counts[r[keep]]
    return sp.csr_matrix((vals, (r[keep], c[keep])), shape=(n, n_cols))  # duplicates summed, as the bag does


def item_weights(popularity: np.ndarray, weighting: Weighting) -> np.ndarray:
    """Per-item fitting weight from training interaction counts (items with none get 0)."""
    pop = np.asarray(popularity, dtype=np.float64)
    if weighting == "uniform":
        w = (pop > 0).astype(np.float64)
    elif weighting == "log":
        w = np.log1p(pop)
    elif weighting == "sqrt":
        w = np.sqrt(pop)
    elif weighting == "popularity":
        w = pop.copy()
    else:
        raise ValueError(f"unknown weighting {weighting!r}: uniform, log, sqrt or popularity")
    return w


def fit_mapper(
    item_vectors: np.ndarray,
    attribute_rows: np.ndarray,
    popularity: np.ndarray,
    prior: np.ndarray,
    *,
    l2: float = 0.1,
    weighting: Weighting = "popularity",
    rescale: bool = True,
) -> ColdItemMapper:
    """Fit ``ColdItemMapper`` on the warm items: weighted ridge from the attribute bag to the trained vector.

    Args:
        item_vectors: (V, D) trained item vectors (the bundle's ``item_embeddings``), row = item index.
        attribute_rows: (V, A) PAD-padded attribute indices per item (the tower's ``item_attributes``).
        popularity: (V,) training interactions per item; items with none (and the reserved rows,
            and items without attributes) are not fitted on.
        prior: (n_attribute_rows, D) what the ridge shrinks each token's vector toward: the tower's
            attribute embeddings (``l2`` -> infinity: the tower's attribute path plus the bias).
        l2: ridge penalty, in units of "one average-weight item" (weights are normalised to mean 1).
        weighting: per-item weight from popularity; cold targets are interactions, so popular warm
            items say more about where an interacted item sits.
        rescale: multiply the output so the fitted warm items' weighted mean norm matches their
            trained vectors' (ridge predictions are shrunk toward the mean, hence short).
    """
    Y = np.asarray(item_vectors, dtype=np.float32)  # (V, D); float32: a 1M-item catalogue, not a float64 copy of it
    rows = np.asarray(attribute_rows, dtype=np.int64)
    E = np.asarray(prior, dtype=np.float64)
    n_tok, d = E.shape
    if Y.shape[0] != rows.shape[0] or Y.shape[1] != d:
        raise ValueError(f"item_vectors {Y.shape}, attribute_rows {rows.shape} and prior {E.shape} do not fit")
    w = item_weights(popularity, weighting)[: len(Y)]
    w[:N_RESERVED] = 0
    w[~(rows != PAD_IDX).any(axis=1)] = 0
    fit = np.flatnonzero(w > 0)
    if not len(fit):
        raise NoWarmItems("no warm item with attributes and training interactions to fit the cold-item mapper on")
    w = w[fit] / w[fit].mean()
    X = sp.hstack([_mean_bag(rows[fit], n_tok), sp.csr_matrix(np.ones((len(fit), 1)))], format="csr")  # (n, T + 1)
    Xw = sp.diags(w) @ X
    penalty = np.full(n_tok + 1, float(l2))
    penalty[-1] = 1e-8  # the bias is (almost) not penalised
    penalty[:N_RESERVED] = max(float(l2), 1.0)  # PAD/UNK rows: never used by a bag, kept at the prior
    gram = (X.T @ Xw + sp.diags(penalty)).tocsc()
    prior_aug = np.vstack([E, np.zeros((1, d))])  # (T + 1, D)
    rhs = (X.T @ (w[:, None].astype(np.float32) * Y[fit])).astype(np.float64) + penalty[:, None] * prior_aug
    theta = spla.splu(gram).solve(np.asarray(rhs))  # (T + 1, D)
    weight = torch.from_numpy(theta[:-1].astype(np.float32))
    bias = torch.from_numpy(theta[-1].astype(np.float32))
    mapper = ColdItemMapper(weight=weight, bias=bias, scale=1.0)
    scale = 1.0
    if rescale:
        pred = mapper.vectors(torch.from_numpy(rows[fit])).numpy()  # (n, D)
        scale = float(np.sum(w * np.linalg.norm(Y[fit], axis=1)) / max(np.sum(w * np.linalg.norm(pred, axis=1)), 1e-12))
    meta = {"l2": float(l2), "weighting": weighting, "rescale": bool(rescale), "fitted_items": int(len(fit))}
    log.info("cold-item mapper fitted on %d warm items (l2=%g, %s weights, scale %.3f)", len(fit), l2, weighting, scale)
    return ColdItemMapper(weight=weight, bias=bias, scale=scale, meta=meta)


def fit_from_net(net: Any, item_vectors: np.ndarray, popularity: np.ndarray, **kwargs: Any) -> ColdItemMapper | None:
    """``fit_mapper`` on a trained ``TwoTowerNet``: its attribute table and attribute embeddings as the
    prior. None for a net without attributes (nothing to map from) or without a warm item with
    attributes (nothing to fit on)."""
    tower = net.item_tower
    if tower.attr_emb is None:
        return None
    kwargs.setdefault("l2", net.cfg.cold_item_l2)
    kwargs.setdefault("weighting", net.cfg.cold_item_weighting)
    rows = tower.item_attributes.detach().cpu().numpy()
    prior = tower.attr_emb.weight.detach().float().cpu().numpy()
    try:
        return fit_mapper(item_vectors, rows, popularity, prior, **kwargs)
    except NoWarmItems as e:
        log.warning("%s: cold items will take the item tower's attribute path", e)
        return None
