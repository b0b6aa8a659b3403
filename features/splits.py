"""Train / validation / test splits over ``Sequences``, without copying histories.

Two protocols:

* leave-one-out (Kang & McAuley, SASRec, ICDM 2018; the S3Rec and most published sequential
  results): each user's last step is the test target, the second-last the validation target, the
  rest trains. Users with fewer than ``min_events`` steps only train.
* global time split: two timestamps cut the log; training sees only events before the first, and
  each user's first event after a cut is that user's validation / test target. Closer to deployment
  (no peeking at other users' future), and the check that a model does not live off leakage.

Evaluation targets point into the full sequences (``history_end`` is the flat index of the target,
so the history is everything of that row before it), which keeps a 10-million-event split to a
handful of integer arrays.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from towerline.features.sequences import Sequences

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTargets:
    rows: np.ndarray  # (U,) row of each evaluated user in ``Split.full``
    history_end: np.ndarray  # (U,) flat index of the target event; history = offsets[row]:history_end
    targets: np.ndarray  # (U,) item index to predict

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Split:
    kind: str
    full: Sequences  # every event; evaluation histories are read from here
    train: Sequences  # training prefixes: every position is a training example
    valid: EvalTargets
    test: EvalTargets

    def summary(self) -> dict[str, int]:
        return {
            "users": len(self.full),
            "train_users": len(self.train),
            "train_events": self.train.n_events,
            "valid_users": len(self.valid),
            "test_users": len(self.test),
        }


def with_validation_in_training(split: Split) -> Split:
    """The leave-one-out ``split`` with each evaluated user's validation step moved into training.

    For the final test model (``trainer.refit``): once validation has chosen the epoch count, the
    step right before each test target is the most recent evidence of what the user does next, and
    every deployed model trains on it. ``valid`` is kept (its target is now a training target, so
    its metrics are no longer a held-out measure); ``test`` is unchanged.
    """
    if split.kind != "leave_one_out":
        raise ValueError(f"refit needs a leave-one-out split, got {split.kind!r}")
    lengths = split.full.lengths.copy()
    lengths[split.test.rows] -= 1  # everything but the test step; users too short to evaluate keep all
    return dataclasses.replace(split, train=split.full.truncate(lengths))


def split_leave_one_out(seqs: Sequences, min_events: int = 3) -> Split:
    """Last step -> test, second-last -> validation, the rest -> training (per user)."""
    n = seqs.lengths
    eligible = n >= min_events
    rows = np.flatnonzero(eligible)
    ends = seqs.offsets[1:][rows]
    train_len = np.where(eligible, n - 2, n)
    split = Split(
        kind="leave_one_out",
        full=seqs,
        train=seqs.truncate(train_len),
        valid=EvalTargets(rows, ends - 2, seqs.item_idx[ends - 2]),
        test=EvalTargets(rows, ends - 1, seqs.item_idx[ends - 1]),
    )
    log.info("leave-one-out split: %s (%d users too short to evaluate)", split.summary(), int((~eligible).sum()))
    return split


def split_by_time(seqs: Sequences, quantiles: tuple[float, float] = (0.8, 0.9)) -> Split:
    """Cut the log at two time quantiles; each user's first event past a cut is its target there."""
    if seqs.n_events == 0:
        raise ValueError("cannot split an empty event log")
    t_valid, t_test = np.quantile(seqs.timestamp, quantiles).astype(np.int64)
    starts = seqs.offsets[:-1]
    n = seqs.lengths
    before_valid = np.add.reduceat((seqs.timestamp < t_valid).astype(np.int64), starts)
    before_test = np.add.reduceat((seqs.timestamp < t_test).astype(np.int64), starts)

    def targets_at(count_before: np.ndarray, upper: int | None) -> EvalTargets:
        pos = starts + count_before
        ok = (count_before >= 1) & (count_before < n)
        if upper is not None:
            ok &= seqs.timestamp[np.minimum(pos, len(seqs.timestamp) - 1)] < upper
        rows = np.flatnonzero(ok)
        return EvalTargets(rows, pos[rows], seqs.item_idx[pos[rows]])

    split = Split(
        kind="time",
        full=seqs,
        train=seqs.truncate(before_valid),
        valid=targets_at(before_valid, int(t_test)),
        test=targets_at(before_test, None),
    )
    log.info("time split at %d / %d: %s", t_valid, t_test, split.summary())
    return split
