"""Warm start: continue training a registered version on newer events, vocabularies grown in place.

``towerline train --warm-start models:/name@alias`` (or ``runs:/<run_id>/bundle``, a bundle or a
run directory) sets ``trainer.warm_start``; ``train`` then calls the two functions below around the
DataModule:

1. ``grow_prepared_data(dm, parent)`` after ``prepare_data``: the vocabularies of the new data are
   rebuilt as *the parent's ids first, in the parent's order, new ids after* (``grow_vocab``), and
   the prepared sequences and attribute table are re-encoded to them. Every index the parent handed
   out keeps its meaning, so its embedding rows can be copied as they are; items or users the new
   window does not mention keep their rows too (they stay servable and are not retrained).
2. ``load_parent_weights(net, parent)`` after the system is built: every parameter of the parent
   is copied into the new net; tables that grew (item ids, attributes, event types) get the parent's
   rows at the top and fresh initialisation below. The optimiser starts fresh (a new Trainer): the
   parent's AdamW moments belong to another data window and another table shape.

The run records its parent: the resolved config holds ``trainer.warm_start`` (an MLflow param) and
``train`` tags the run ``parent_model`` (``parent_tags``). Fine-tuning on the newest window instead
of retraining on all history is the usual incremental recipe for production recommenders (e.g.
continual training of YouTube's retrieval models, Yi et al., RecSys 2019); its cost on the synthetic
shop is measured in ``bench/warm_start.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from towerline.errors import BundleError
from towerline.features.sequences import Sequences
from towerline.features.vocab import N_RESERVED, PAD_IDX, Vocab, Vocabs

if TYPE_CHECKING:
    from towerline.training.bundle import Bundle
    from towerline.training.data import SequenceDataModule
    from towerline.training.model import TwoTowerNet

log = logging.getLogger(__name__)

VOCABS = ("users", "items", "event_types", "attributes")


def load_parent(uri: str) -> "Bundle":
    """The parent bundle of ``uri``: ``models:/``, ``runs:/``, a bundle directory or a run directory
    (``<run>/bundle``, as ``towerline train --out`` writes it)."""
    from towerline.training.bundle import load_bundle

    p = Path(uri)
    if p.is_dir() and not (p / "manifest.json").exists() and (p / "bundle").is_dir():
        p = p / "bundle"
        uri = str(p)
    try:
        return load_bundle(uri)
    except BundleError as e:
        raise BundleError(f"--warm-start {uri}: {e}") from None


def grow_vocab(old: Vocab, new: Vocab) -> Vocab:
    """``old``'s ids in their order, then the ids only ``new`` has (in ``new``'s order)."""
    fresh = new.ids[~np.isin(new.ids.astype(str), old.ids.astype(str))]
    return Vocab(np.concatenate([old.ids, fresh]).astype(object))


def _remap(old: Vocab, grown: Vocab) -> np.ndarray:
    """(len(old),) int64: index in ``grown`` of every index of ``old`` (reserved rows stay put)."""
    out = np.arange(len(old), dtype=np.int64)
    out[N_RESERVED:] = grown.encode(old.ids)
    return out


def grow_prepared_data(dm: "SequenceDataModule", parent: "Bundle") -> Vocabs:
    """Re-encode ``dm``'s prepared data (vocab/, sequences.npz, item_attributes.npy) to the parent's
    vocabularies grown by the new ids; idempotent, so a reused data cache is left as it is."""
    data_vocabs = Vocabs.load(dm.vocab_dir)
    grown = Vocabs(*(grow_vocab(getattr(parent.vocabs, n), getattr(data_vocabs, n)) for n in VOCABS))
    maps = {n: _remap(getattr(data_vocabs, n), getattr(grown, n)) for n in VOCABS}
    if all(np.array_equal(m, np.arange(len(m))) and len(getattr(grown, n)) == len(m) for n, m in maps.items()):
        return grown
    seqs = Sequences.load(dm.work_dir / "sequences.npz")
    Sequences(
        offsets=seqs.offsets,
        user_idx=maps["users"][seqs.user_idx],
        item_idx=maps["items"][seqs.item_idx],
        event_type_idx=maps["event_types"][seqs.event_type_idx],
        timestamp=seqs.timestamp,
        value=seqs.value,
    ).save(dm.work_dir / "sequences.npz")
    attrs = np.load(dm.work_dir / "item_attributes.npy", allow_pickle=False)  # (V_data, A)
    table = np.full((len(grown.items), attrs.shape[1]), PAD_IDX, dtype=np.int64)  # (V_grown, A)
    # items the new data does not describe keep the parent's attributes (same indices: old ids first)
    old = parent.net.item_tower.item_attributes
    if old is not None:
        w = min(attrs.shape[1], old.shape[1])
        table[: old.shape[0], :w] = old[:, :w].numpy()
    table[maps["items"]] = maps["attributes"][attrs]
    np.save(dm.work_dir / "item_attributes.npy", table)
    grown.save(dm.vocab_dir)
    added = {n: len(getattr(grown, n)) - len(getattr(parent.vocabs, n)) for n in VOCABS}
    log.info("warm start: vocabularies grown from the parent's (%s)", ", ".join(f"+{v} {k}" for k, v in added.items()))
    return grown


@torch.no_grad()
def load_parent_weights(net: "TwoTowerNet", parent: "Bundle") -> dict[str, int]:
    """Copy the parent's weights into ``net``: same-shape tensors whole, grown tables row by row.

    Returns ``{name: rows copied}`` of the tables that grew. The attribute-table buffer is not
    copied (``grow_prepared_data`` already wrote the parent's rows into the new one). Raises
    ``BundleError`` when a shape differs other than by rows (another ``dim``, layer count...).
    """
    old = parent.net.state_dict()
    grown: dict[str, int] = {}
    for name, param in net.state_dict().items():
        if name.endswith("item_attributes") or name not in old:
            continue
        src = old[name]
        if src.shape == param.shape:
            param.copy_(src)
        elif src.dim() == param.dim() and src.shape[1:] == param.shape[1:] and src.shape[0] <= param.shape[0]:
            param[: src.shape[0]].copy_(src)
            grown[name] = int(src.shape[0])
        else:
            raise BundleError(
                f"--warm-start: parent tensor {name} has shape {tuple(src.shape)}, this config needs "
                f"{tuple(param.shape)}; warm start keeps the parent's model.* settings"
            )
    log.info("warm start: parent weights loaded (%s grown)", ", ".join(grown) or "no table")
    return grown


def parent_tags(parent: "Bundle", uri: str) -> dict[str, str]:
    """MLflow tags naming the parent version (``parent_model``: the URI given; plus name/version/run)."""
    tags = {"parent_model": uri}
    if parent.model_name and parent.model_version:
        tags["parent_model_version"] = f"models:/{parent.model_name}/{parent.model_version}"
    run_id = parent.manifest.get("run_id")
    if run_id:
        tags["parent_run_id"] = str(run_id)
    return tags


def check_compatible(parent: "Bundle", model_cfg: dict) -> None:
    """Refuse a config whose network shape differs from the parent's (copying would be meaningless)."""
    old = {"time_gaps": False, **parent.net_meta["cfg"]}  # parents from before model.time_gaps had none
    keys = ("dim", "n_layers", "n_heads", "max_len", "use_attributes", "use_event_type", "time_gaps")
    diff = [f"model.{k}: parent {old.get(k)!r}, config {model_cfg.get(k)!r}" for k in keys if old.get(k) != model_cfg.get(k)]
    if diff:
        raise BundleError("--warm-start: the config's network differs from the parent's (" + "; ".join(diff) +
                          "); use the parent's model settings: " + json.dumps({k: old.get(k) for k in keys}))
