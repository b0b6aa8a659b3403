"""The LightningDataModule: data set -> vocabularies and sequences (once) -> split -> batches.

``prepare_data`` does the one-off work in one process: read (or generate) the data through
``towerline.features``, build vocabularies and sequences, and write them under ``work_dir``
(JSON vocabularies and a ``.npz`` of plain integer arrays, loaded with ``allow_pickle=False``).
``setup`` reads those files and splits them in every process, as Lightning's DataModule guide asks.

The cache is keyed on what made it (``cache_key``: the data settings, ``model.max_attributes`` and
the size and mtime of the source files), stored in ``prepared.json`` beside the arrays. A run whose
key differs rebuilds the cache and logs what changed, so two runs into one ``--out`` never share
data by accident.

Training examples are windows, not prefixes: a sequence of length L becomes ceil((L-1)/T) windows of
T steps, each position predicting the next item, so one pass covers every position of every
sequence (SASRec-style) instead of one sample per prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data import Dataset as TorchDataset
from towerline.config import DataConfig, TowerlineConfig
from towerline.features.contracts import Dataset
from towerline.features.readers import load_dataset
from towerline.features.sequences import Sequences, build_sequences, left_padded_windows
from towerline.features.splits import (
    EvalTargets,
    Split,
    split_by_time,
    split_leave_one_out,
    with_validation_in_training,
)
from towerline.features.synthetic import generate_dataset
from towerline.features.vocab import (
    PAD_IDX,
    Vocabs,
    build_vocabs,
    item_attribute_matrix,
)

log = logging.getLogger(__name__)

PREPARED = "prepared.json"  # the cache's marker: written last, holds the cache key
# Data settings that ``setup`` reads to split the cached sequences; they shape no cached file.
_SPLIT_ONLY_FIELDS = ("min_user_events", "split", "time_split_quantiles")


def load_data(cfg: DataConfig) -> Dataset:
    """The configured data set: synthetic (the embedded default), S3Rec, CSV or Parquet files."""
    if cfg.format == "synthetic":
        return generate_dataset(cfg.synthetic_users, cfg.synthetic_items, seed=cfg.seed)
    dataset, _report = load_dataset(cfg.path, format=cfg.format, name=cfg.name, columns=cfg.columns)
    return dataset


def _source_files(path: str | None) -> list[dict[str, Any]]:
    """Name, size and mtime of the files a path-based data set is read from: an edited file at the
    same path is other data. A file brings its siblings of the same stem (S3Rec's
    ``<Name>_item2attributes.json``); a folder, every file in it."""
    if not path:
        return []
    p = Path(path).resolve()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
    else:
        siblings = p.parent.iterdir() if p.parent.is_dir() else ()
        files = sorted(f for f in siblings if f.is_file() and f.name.startswith(p.stem))
    return [{"file": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def cache_key(cfg: TowerlineConfig) -> dict[str, Any]:
    """Everything that shapes the files ``prepare_data`` writes, with its sha256 under ``"sha256"``.

    The data settings (less the split ones, which ``setup`` applies to the cached sequences),
    ``model.max_attributes`` (the width of the item-attribute matrix) and the source files' sizes and
    mtimes. A data path is made absolute: a relative one means other data from another directory.
    """
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _SPLIT_ONLY_FIELDS}
    if data.get("path"):
        data["path"] = str(Path(data["path"]).resolve())
    if not data.get("columns"):  # no mapping: the key caches made before data.columns existed have
        data.pop("columns", None)
    key: dict[str, Any] = {
        "data": data,
        "max_attributes": cfg.model.max_attributes,
        "sources": _source_files(cfg.data.path),
    }
    key = json.loads(json.dumps(key, default=str))  # as prepared.json will hold it (tuples as lists)
    key["sha256"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def _key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"data.format: 'synthetic' -> 's3rec'"`` for each setting that differs (sources summarised)."""
    changes = []
    for name in sorted(set(old.get("data", {})) | set(new["data"])):
        a, b = old.get("data", {}).get(name), new["data"].get(name)
        if a != b:
            changes.append(f"data.{name}: {a!r} -> {b!r}")
    if old.get("max_attributes") != new["max_attributes"]:
        changes.append(f"model.max_attributes: {old.get('max_attributes')!r} -> {new['max_attributes']!r}")
    if not changes and old.get("sources") != new["sources"]:
        changes.append("the source files changed (size or modification time)")
    return changes or ["prepared by a Towerline version that did not record its cache key"]


def make_split(seqs: Sequences, cfg: DataConfig) -> Split:
    if cfg.split == "time":
        return split_by_time(seqs, cfg.time_split_quantiles)
    return split_leave_one_out(seqs, cfg.min_user_events)


def training_windows(train: Sequences, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, event types, next-item targets, input timestamps), each (S, max_len), right-aligned,
    PAD (time 0) on the left.

    Window ends step back from each sequence's end by ``max_len`` so the windows tile the sequence:
    input column j is step e-1-T+j and its target is step e-T+j, the item that came next. The input
    steps' times are what a net with ``model.time_gaps`` reads (inference windows carry them alike).
    """
    lengths = train.lengths
    n_windows = np.maximum(np.ceil((lengths - 1) / max_len).astype(np.int64), 0)  # rows of length 1 teach nothing
    rows = np.repeat(np.arange(len(train)), n_windows)
    k = np.arange(len(rows)) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)  # window number within its row
    starts = train.offsets[:-1][rows]
    ends = train.offsets[1:][rows] - k * max_len  # exclusive end of the target window
    inputs = left_padded_windows(train.item_idx, starts, ends - 1, max_len)
    types = left_padded_windows(train.event_type_idx, starts, ends - 1, max_len)
    targets = left_padded_windows(train.item_idx, starts + 1, ends, max_len)
    ts = left_padded_windows(train.timestamp.astype(np.int64), starts, ends - 1, max_len)
    return inputs, types, targets, ts


def trim_left_padding(items: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the columns that are padding in every row of a right-aligned (B, T) batch.

    Most users have far fewer than ``max_len`` steps (Beauty: about 9 of 50), and the user tower
    counts positions back from the newest step, so cutting all-PAD columns changes no output while
    saving most of the attention and MLP work.
    """
    longest = int((items != PAD_IDX).sum(dim=1).max()) if items.numel() else 0
    width = max(longest, 1)
    return tuple(t[:, -width:] for t in (items, *others))


class EvalUsers(TorchDataset):
    """One evaluated user per item: the last ``max_len`` history steps, the target and the whole
    history (for masking already-seen items, as the published protocol does)."""

    def __init__(self, full: Sequences, targets: EvalTargets, max_len: int):
        self.full, self.targets = full, targets
        starts = full.offsets[:-1][targets.rows]
        self.starts = starts
        self.items = torch.from_numpy(left_padded_windows(full.item_idx, starts, targets.history_end, max_len))
        self.types = torch.from_numpy(left_padded_windows(full.event_type_idx, starts, targets.history_end, max_len))
        self.ts = torch.from_numpy(left_padded_windows(full.timestamp.astype(np.int64), starts, targets.history_end, max_len))
        self.target = torch.from_numpy(targets.targets.astype(np.int64))

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        history = torch.from_numpy(self.full.item_idx[self.starts[i] : self.targets.history_end[i]])
        return self.items[i], self.types[i], self.target[i], history, self.ts[i]


def collate_eval(batch: list) -> dict[str, torch.Tensor]:
    items, types, target, history, ts = zip(*batch)
    return {
        "items": torch.stack(items),  # (B, T)
        "types": torch.stack(types),  # (B, T)
        "ts": torch.stack(ts),  # (B, T) event times (0 at padding)
        "target": torch.stack(target),  # (B,)
        "history": torch.nn.utils.rnn.pad_sequence(list(history), batch_first=True, padding_value=PAD_IDX),  # (B, H)
    }


@dataclass(frozen=True)
class DataStats:
    """What the model needs to size its tables, known after ``setup``."""

    n_items: int
    n_attributes: int
    n_event_types: int
    n_users: int


class SequenceDataModule(L.LightningDataModule):
    def __init__(self, cfg: TowerlineConfig, work_dir: str | Path, dataset: Dataset | None = None):
        """``dataset``: the data ``cfg.data`` describes, when the caller has read it already
        (quickstart validates and describes it first); ``prepare_data`` then does not read it again."""
        super().__init__()
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self._dataset = dataset
        self.vocabs: Vocabs | None = None
        self.split: Split | None = None
        self.item_attributes: np.ndarray | None = None
        self.item_counts: np.ndarray | None = None
        self.dataset_items: pd.DataFrame | None = None
        self._prepared = False  # Lightning calls prepare_data again inside fit(): check the cache once

    @property
    def vocab_dir(self) -> Path:
        return self.work_dir / "vocab"

    def cache_changes(self, key: dict[str, Any] | None = None) -> list[str] | None:
        """None when ``work_dir`` holds no prepared data; else what differs between the config that
        prepared it and this one (``key``, default ``cache_key(self.cfg)``); empty: the cache is this
        config's."""
        marker = self.work_dir / PREPARED
        if not marker.exists():
            return None
        try:
            old = json.loads(marker.read_text()).get("cache_key") or {}
        except (ValueError, AttributeError):
            old = {}
        new = key or cache_key(self.cfg)
        return [] if old.get("sha256") == new["sha256"] else _key_changes(old, new)

    def prepare_data(self) -> None:
        if self._prepared:
            return
        key = cache_key(self.cfg)  # before reading: a source edited meanwhile is rebuilt next time
        changes = self.cache_changes(key)
        if changes == []:
            log.info("data: reusing the cache in %s (same data config)", self.work_dir)
            self._prepared = True
            return
        if changes:
            log.warning("data: %s was prepared from other data (%s); rebuilding it", self.work_dir, "; ".join(changes))
            (self.work_dir / PREPARED).unlink()  # first: a rebuild that fails half-way leaves no valid-looking cache
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.data.engine == "ray":  # the same files, built by Ray Data from event shards
            from towerline.features.ray_data import prepare_features

            summary = prepare_features(self.cfg.data, self.work_dir, self.cfg.model.max_attributes)
            counts = {k: summary[k] for k in ("events", "users", "items")}
            (self.work_dir / PREPARED).write_text(json.dumps({"dataset": summary["dataset"], **counts, "cache_key": key}, indent=2))
            self._prepared = True
            return
        dataset = self._dataset if self._dataset is not None else load_data(self.cfg.data)
        self._dataset = None  # built into the cache below; not kept alive for the whole fit
        vocabs = build_vocabs(dataset)
        vocabs.save(self.vocab_dir)
        build_sequences(dataset.events, vocabs).save(self.work_dir / "sequences.npz")
        np.save(
            self.work_dir / "item_attributes.npy",
            item_attribute_matrix(dataset.items, vocabs, self.cfg.model.max_attributes),
        )
        dataset.items.to_parquet(self.work_dir / "items.parquet")
        # consent only: serving must not personalise for users who said no, and needs nothing else
        dataset.users[["user_id", "consent"]].astype({"user_id": str, "consent": bool}).to_parquet(self.work_dir / "users.parquet")
        counts = {"events": len(dataset.events), "users": len(dataset.users), "items": len(dataset.items)}
        (self.work_dir / PREPARED).write_text(
            json.dumps({"dataset": dataset.name, **counts, "cache_key": key}, indent=2)
        )
        log.info("data: prepared %s in %s (%s events, %s users, %s items)", dataset.name, self.work_dir,
                 *(f"{n:,}" for n in counts.values()))
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self.vocabs = Vocabs.load(self.vocab_dir)
        seqs = Sequences.load(self.work_dir / "sequences.npz")
        self.split = make_split(seqs, self.cfg.data)
        if self.cfg.trainer.refit:  # the test model: validation steps train too (features/splits.py)
            self.split = with_validation_in_training(self.split)
        self.item_attributes = np.load(self.work_dir / "item_attributes.npy", allow_pickle=False)
        self.item_counts = np.bincount(self.split.train.item_idx, minlength=len(self.vocabs.items))

    def prepared_counts(self) -> dict[str, int]:
        """``events``, ``users``, ``items`` of the prepared data set (from ``prepared.json``)."""
        try:
            marker = json.loads((self.work_dir / PREPARED).read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(marker[k]) for k in ("events", "users", "items") if k in marker}

    def users_consent(self) -> pd.DataFrame:
        """``user_id, consent`` of every user, for the bundle (no other user attribute leaves training)."""
        return pd.read_parquet(self.work_dir / "users.parquet")

    def items_table(self) -> pd.DataFrame:
        """The catalogue as loaded (attributes, price, stock), for the bundle's business rules."""
        return pd.read_parquet(self.work_dir / "items.parquet")

    @property
    def stats(self) -> DataStats:
        if self.vocabs is None:
            raise RuntimeError("call prepare_data() and setup() first")
        return DataStats(
            n_items=len(self.vocabs.items),
            n_attributes=len(self.vocabs.attributes),
            n_event_types=len(self.vocabs.event_types),
            n_users=len(self.vocabs.users),
        )

    def n_train_batches(self) -> int:
        """Training batches per epoch (after ``limit_train_batches``), from the sequence lengths alone:
        the same count ``training_windows`` makes, without building the windows."""
        lengths = self.split.train.lengths
        windows = int(np.maximum(np.ceil((lengths - 1) / self.cfg.model.max_len), 0).sum())
        batches = -(-windows // self.cfg.trainer.batch_size)
        limit = self.cfg.trainer.limit_train_batches
        if isinstance(limit, float) and limit <= 1.0:
            return max(int(batches * limit), 1 if batches else 0)
        return min(batches, int(limit))

    def training_dataset(self) -> TensorDataset:
        """The training windows as (inputs, types, targets, timestamps) tensors (``training_windows``)."""
        return TensorDataset(*(torch.from_numpy(a) for a in training_windows(self.split.train, self.cfg.model.max_len)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.training_dataset(),
            batch_size=self.cfg.trainer.batch_size,
            shuffle=True,
            num_workers=self.cfg.trainer.num_workers,
            generator=torch.Generator().manual_seed(self.cfg.trainer.seed),
        )

    def _eval_loader(self, targets: EvalTargets) -> DataLoader:
        return DataLoader(
            EvalUsers(self.split.full, targets, self.cfg.model.max_len),
            batch_size=self.cfg.trainer.eval_batch_size,
            shuffle=False,
            collate_fn=collate_eval,
            num_workers=self.cfg.trainer.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.split.valid)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.split.test)
