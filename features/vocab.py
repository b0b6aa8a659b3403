"""Id vocabularies: external string ids <-> dense indices, with reserved padding and unknown slots.

Index 0 is padding (left-padded histories) and index 1 stands for any id the vocabulary has never
seen (a new item arriving over ``POST /events`` before the next training run), so every model table
can be indexed with whatever arrives. Real ids start at ``N_RESERVED``. Encoding is one hash lookup
per distinct value (``pandas.Index.get_indexer``), and Categorical columns are encoded through their
categories, so 10 million events encode in about a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from towerline.errors import BundleError
from towerline.features.contracts import EVENT_TYPES, Dataset

log = logging.getLogger(__name__)

PAD_IDX = 0
UNK_IDX = 1
N_RESERVED = 2
RESERVED_TOKENS = ("<pad>", "<unk>")


@dataclass(frozen=True)
class Vocab:
    """``ids[i]`` is the external id at index ``i + N_RESERVED``."""

    ids: np.ndarray  # (n,) object array of str
    _index: pd.Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = pd.Index(self.ids, dtype=object)
        if not index.is_unique:
            dup = index[index.duplicated()][0]
            raise ValueError(f"vocabulary ids must be unique; {dup!r} appears twice")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        """Table size including the reserved rows: the ``num_embeddings`` a model needs."""
        return len(self.ids) + N_RESERVED

    def __contains__(self, external_id: object) -> bool:
        return external_id in self._index

    def encode(self, values: Iterable[str] | pd.Series | np.ndarray) -> np.ndarray:
        """External ids -> int64 indices; ids never seen map to ``UNK_IDX``."""
        if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
            per_category = self.encode(values.cat.categories.astype(str))
            codes = values.cat.codes.to_numpy()
            lookup = np.append(per_category, UNK_IDX)  # code -1 (missing) -> UNK
            return lookup[codes]
        arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
        pos = self._index.get_indexer(arr)
        return np.where(pos < 0, UNK_IDX, pos + N_RESERVED).astype(np.int64)

    def encode_one(self, external_id: str) -> int:
        pos = self._index.get_indexer([external_id])[0]
        return UNK_IDX if pos < 0 else int(pos) + N_RESERVED

    def decode(self, idx: np.ndarray | Iterable[int]) -> np.ndarray:
        """Indices -> external ids; reserved indices decode to ``<pad>`` / ``<unk>``."""
        idx = np.asarray(idx, dtype=np.int64)
        table = np.concatenate([np.array(RESERVED_TOKENS, dtype=object), self.ids])
        return table[idx]

    def save(self, path: str | Path) -> None:
        payload = {"reserved": list(RESERVED_TOKENS), "ids": [str(x) for x in self.ids]}
        Path(path).write_text(json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        p = Path(path)
        try:
            payload = json.loads(p.read_text())
            ids = payload["ids"]
        except FileNotFoundError:
            raise BundleError(f"vocabulary file missing: {p}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(f"{p}: not a Towerline vocabulary ({e})") from None
        return cls(np.array(ids, dtype=object))


def build_vocab(values: pd.Series | np.ndarray | Iterable[str], first: Iterable[str] = ()) -> Vocab:
    """Distinct values, ``first`` in the given order then the rest sorted (deterministic indices)."""
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        used = np.unique(values.cat.codes.to_numpy())
        used = used[used >= 0]
        distinct = np.asarray(values.cat.categories.astype(str), dtype=object)[used]
    else:
        distinct = _distinct(pd.Series(values if hasattr(values, "__len__") else list(values), dtype=object))
    first = [str(x) for x in first]
    rest = np.sort(np.setdiff1d(np.asarray(distinct, dtype=str), np.asarray(first, dtype=str)))
    return Vocab(np.array(first + rest.tolist(), dtype=object))


@dataclass(frozen=True)
class Vocabs:
    """All vocabularies of one data set; saved as ``vocab/{users,items,event_types,attributes}.json``."""

    users: Vocab
    items: Vocab
    event_types: Vocab
    attributes: Vocab

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("users", "items", "event_types", "attributes"):
            getattr(self, name).save(d / f"{name}.json")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabs":
        d = Path(directory)
        return cls(*(Vocab.load(d / f"{name}.json") for name in ("users", "items", "event_types", "attributes")))


def build_vocabs(dataset: Dataset) -> Vocabs:
    """Vocabularies over everything the data set mentions.

    Items are the union of the catalogue and the event log: catalogue items without events can
    still be recommended through their attributes, and events on items the catalogue lacks are
    reported by validation but kept. Event types keep the funnel order of ``EVENT_TYPES`` so that a
    larger index means stronger intent.
    """
    events, items = dataset.events, dataset.items
    item_ids = pd.concat(
        [pd.Series(_as_str(items["item_id"]), dtype=object), pd.Series(_distinct(events["item_id"]), dtype=object)],
        ignore_index=True,
    )
    user_ids = pd.concat(
        [pd.Series(_distinct(events["user_id"]), dtype=object), pd.Series(_as_str(dataset.users["user_id"]), dtype=object)],
        ignore_index=True,
    )
    seen_types = _distinct(events["event_type"]) if "event_type" in events else np.array([], dtype=object)
    if "attributes" in items and len(items):
        tokens = pd.Series(items["attributes"]).explode().dropna()
        attributes = build_vocab(tokens.astype(str).to_numpy())
    else:
        attributes = Vocab(np.array([], dtype=object))
    vocabs = Vocabs(
        users=build_vocab(user_ids.to_numpy()),
        items=build_vocab(item_ids.to_numpy()),
        event_types=build_vocab(seen_types, first=EVENT_TYPES),
        attributes=attributes,
    )
    log.info(
        "vocabularies: %d users, %d items, %d event types, %d attribute tokens",
        len(vocabs.users.ids), len(vocabs.items.ids), len(vocabs.event_types.ids), len(vocabs.attributes.ids),
    )
    return vocabs


def item_attribute_matrix(items: pd.DataFrame, vocabs: Vocabs, max_attributes: int) -> np.ndarray:
    """(n_items, max_attributes) int64 attribute indices per item row, ``PAD_IDX``-padded.

    Rows follow the item vocabulary (reserved rows and items missing from the catalogue are all
    padding); an item with more tokens keeps its first ``max_attributes``.
    """
    out = np.full((len(vocabs.items), max_attributes), PAD_IDX, dtype=np.int64)
    if "attributes" not in items or not len(items):
        return out
    exploded = items[["item_id", "attributes"]].explode("attributes").dropna(subset=["attributes"])
    if not len(exploded):
        return out
    rows = vocabs.items.encode(_as_str(exploded["item_id"]))
    cols = pd.Series(rows).groupby(rows).cumcount().to_numpy()  # position of the token within its item
    keep = cols < max_attributes
    out[rows[keep], cols[keep]] = vocabs.attributes.encode(exploded["attributes"].astype(str).to_numpy())[keep]
    return out


def _as_str(col: pd.Series) -> np.ndarray:
    if isinstance(col.dtype, pd.CategoricalDtype):
        return np.asarray(col.astype(str), dtype=object)
    return np.asarray(col, dtype=object)


def _distinct(col: pd.Series) -> np.ndarray:
    if isinstance(col.dtype, pd.CategoricalDtype):
        used = np.unique(col.cat.codes.to_numpy())
        return np.asarray(col.cat.categories.astype(str), dtype=object)[used[used >= 0]]
    return pd.unique(col.dropna())
