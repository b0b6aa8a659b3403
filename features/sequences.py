"""Per-user, time-ordered behaviour sequences in one flat (CSR) layout.

All users' events live in flat arrays sorted by (user, time); ``offsets[r]:offsets[r+1]`` is row
``r``'s slice. One sort and a few ``reduceat`` calls build it from millions of events; a list of
per-user arrays would cost a Python object per user and a loop per step.

Consecutive events of one user on the same item (view -> click -> cart -> purchase of one product)
are folded into one step carrying the strongest event type: the funnel of a single product is one
decision, and keeping its four rows would teach a next-item model to predict "the item you just
saw", which history masking then forbids at evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from towerline.features.vocab import PAD_IDX, Vocabs

log = logging.getLogger(__name__)


SEQUENCE_ARRAYS = ("offsets", "user_idx", "item_idx", "event_type_idx", "timestamp", "value")


@dataclass(frozen=True)
class Sequences:
    """Flat time-ordered sequences; row ``r`` is user ``user_idx[r]``."""

    offsets: np.ndarray  # (U+1,) int64
    user_idx: np.ndarray  # (U,) int64 user vocabulary index per row
    item_idx: np.ndarray  # (E,) int64
    event_type_idx: np.ndarray  # (E,) int64
    timestamp: np.ndarray  # (E,) int64 epoch seconds
    value: np.ndarray  # (E,) float64 money (NaN when none)

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_events(self) -> int:
        return int(self.offsets[-1])

    def items_of(self, row: int) -> np.ndarray:
        return self.item_idx[self.offsets[row] : self.offsets[row + 1]]

    def save(self, path: str | Path) -> None:
        """Plain integer/float arrays in one ``.npz``; ``load`` reads them with ``allow_pickle=False``."""
        np.savez(path, **{k: getattr(self, k) for k in SEQUENCE_ARRAYS})

    @classmethod
    def load(cls, path: str | Path) -> "Sequences":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{k: z[k] for k in SEQUENCE_ARRAYS})

    def truncate(self, lengths: np.ndarray, keep: np.ndarray | None = None) -> "Sequences":
        """The first ``lengths[r]`` events of each row (rows where ``keep`` is False, or whose new
        length is 0, are dropped): how a split cuts training prefixes from whole sequences."""
        lengths = np.minimum(np.asarray(lengths, dtype=np.int64), self.lengths)
        keep = (lengths > 0) if keep is None else (keep & (lengths > 0))
        starts = self.offsets[:-1][keep]
        lengths = lengths[keep]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return Sequences(
            offsets=offsets,
            user_idx=self.user_idx[keep],
            item_idx=self.item_idx[gather],
            event_type_idx=self.event_type_idx[gather],
            timestamp=self.timestamp[gather],
            value=self.value[gather],
        )


def build_sequences(events: pd.DataFrame, vocabs: Vocabs, collapse_repeats: bool = True) -> Sequences:
    """Encode and sort events into ``Sequences`` (ties in time keep file order)."""
    user = vocabs.users.encode(events["user_id"])
    item = vocabs.items.encode(events["item_id"])
    if "event_type" in events:
        etype = vocabs.event_types.encode(events["event_type"])
    else:
        etype = np.full(len(events), vocabs.event_types.encode_one("interaction"), dtype=np.int64)
    ts = events["timestamp"].to_numpy(dtype=np.int64)
    value = events["value"].to_numpy(dtype=np.float64) if "value" in events else np.full(len(events), np.nan)

    order = np.lexsort((ts, user))  # stable: equal (user, time) keep their input order
    user, item, etype, ts, value = user[order], item[order], etype[order], ts[order], value[order]
    if collapse_repeats:
        user, item, etype, ts, value = fold_repeats(user, item, etype, ts, value)
    return sequences_from_sorted(user, item, etype, ts, value)


def fold_repeats(
    user: np.ndarray, item: np.ndarray, etype: np.ndarray, ts: np.ndarray, value: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fold runs of one user's consecutive events on one item (arrays sorted by user, time) into one
    step: the strongest event type, the summed value (NaN when none has one), the first time.
    Shared with the Ray Data path (``ray_data.py``), which folds each partition of users alike."""
    if not len(user):
        return user, item, etype, ts, value
    new_step = np.ones(len(user), dtype=bool)
    new_step[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    starts = np.flatnonzero(new_step)
    n_folded = len(user) - len(starts)
    etype = np.maximum.reduceat(etype, starts)
    has_value = ~np.isnan(value)
    total = np.add.reduceat(np.where(has_value, value, 0.0), starts)
    value = np.where(np.logical_or.reduceat(has_value, starts), total, np.nan)
    user, item, ts = user[starts], item[starts], ts[starts]
    if n_folded:
        log.info("folded %d repeated same-item events into %d steps", n_folded, len(starts))
    return user, item, etype, ts, value


def sequences_from_sorted(
    user: np.ndarray, item: np.ndarray, etype: np.ndarray, ts: np.ndarray, value: np.ndarray
) -> Sequences:
    """``Sequences`` from flat step arrays already sorted by (user, time)."""
    row_start = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.array([], dtype=np.int64)
    offsets = np.append(row_start, len(user)).astype(np.int64)
    return Sequences(
        offsets=offsets,
        user_idx=user[row_start],
        item_idx=item,
        event_type_idx=etype,
        timestamp=ts,
        value=value,
    )


def left_padded_windows(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """(B, width) windows ``values[max(start, end-width):end]``, right-aligned, ``PAD_IDX`` on the left.

    Right alignment puts every user's newest event at column ``width-1``, where the causal user
    tower reads its final state.
    """
    cols = np.asarray(ends, dtype=np.int64)[:, None] - width + np.arange(width, dtype=np.int64)  # (B, width)
    valid = cols >= np.asarray(starts, dtype=np.int64)[:, None]
    out = np.where(valid, values[np.clip(cols, 0, max(len(values) - 1, 0))] if len(values) else PAD_IDX, PAD_IDX)
    return out.astype(values.dtype if len(values) else np.int64)
