"""The ranker's data: the retriever's top-N candidates for training, validation and test positions.

A *position* is one (user, moment) pair: the user's steps before it are the history and the step at
it is the true next item, the positive. Candidates come from one batched retrieval pass (user tower
over the history window, scores against the whole catalogue, top-N), with the same protocol as the
retriever's evaluation (``training/metrics.py``): reserved rows and the user's history are masked,
except the target itself when it repeats an earlier item. So the pipeline's candidate list is
exactly the retriever's top-N that retrieval-only metrics rank, and the two can be compared user by
user.

No leakage (the point of this module):

- training positions are steps of ``Split.train`` (each user's training prefix); their history is
  the steps before them, so it never holds the user's validation or test step;
- their candidate lists additionally mask the user's validation and test items, so a held-out item
  is never shown to the ranker, not even as a negative;
- popularity features are counted on training sequences (``ranker_model.build_ranker_features``);
- the retriever was trained on ``Split.train`` only.

When the retriever misses the positive (it is not in the top-N), the training position is **dropped**
rather than having the positive pasted in: a pasted positive would carry a retrieval rank beyond N
that no negative has, and the ranker would learn "rank > N means positive", a signal that never
exists when serving. Those users cannot be helped by any re-ranking of the N candidates anyway; the
share dropped is logged, and at evaluation such users keep their retrieval rank (see
``pipeline_ranks``), so the pipeline metrics count them honestly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from towerline.features.sequences import Sequences
from towerline.features.splits import EvalTargets, Split
from towerline.features.vocab import N_RESERVED, PAD_IDX
from towerline.training import inference
from towerline.training.metrics import target_ranks
from towerline.training.model import TwoTowerNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Positions:
    """Positions as flat indices into ``Sequences`` (``Split.full``): history = ``start:end``, target at ``end``."""

    rows: np.ndarray  # (P,) row of the user in the sequences
    start: np.ndarray  # (P,) flat index of the row's first step
    end: np.ndarray  # (P,) flat index of the target step; history is start:end
    target: np.ndarray  # (P,) item index of the positive
    heldout: np.ndarray  # (P, K) items to keep out of the candidate list (PAD: none)


@dataclass(frozen=True)
class CandidateSet:
    """Everything the ranker trains or evaluates on, one row per position (numpy, CPU)."""

    hist: np.ndarray  # (P, T) int64 newest ``history_len`` items, left-padded
    hist_types: np.ndarray  # (P, T) int64
    hist_ts: np.ndarray  # (P, T) int64
    cand: np.ndarray  # (P, N) int64 retriever top-N, best first
    cand_scores: np.ndarray  # (P, N) float32 retrieval scores
    target_pos: np.ndarray  # (P,) int64 column of the positive in ``cand``, -1 when retrieval missed it
    retrieval_rank: np.ndarray  # (P,) int64 0-based full-catalogue rank of the positive (history masked)
    rows: np.ndarray  # (P,) row of the user in ``Split.full``
    users: np.ndarray  # (P,) user vocabulary index (the ranker's profile table row)

    def __len__(self) -> int:
        return len(self.target_pos)

    def subset(self, keep: np.ndarray) -> "CandidateSet":
        return CandidateSet(**{k: v[keep] for k, v in self.__dict__.items()})

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(hist, hist_types, hist_ts, cand, cand_scores, target_pos, retrieval_rank, users) as tensors."""
        return tuple(
            torch.from_numpy(np.ascontiguousarray(a))
            for a in (self.hist, self.hist_types, self.hist_ts, self.cand, self.cand_scores, self.target_pos,
                      self.retrieval_rank, self.users)
        )

    @property
    def recall(self) -> float:
        """Share of positions whose positive is among the N candidates (the pipeline's ceiling)."""
        return float((self.target_pos >= 0).mean()) if len(self) else 0.0


@dataclass(frozen=True)
class RankerData:
    train: CandidateSet  # positions whose positive was retrieved (misses dropped)
    valid: CandidateSet
    test: CandidateSet
    train_recall: float  # share of sampled training positions kept


def _user_heldout(split: Split, n_rows: int) -> np.ndarray:
    """(rows of Split.full, 2) validation and test item of each user (PAD when none)."""
    out = np.full((n_rows, 2), PAD_IDX, dtype=np.int64)
    out[split.valid.rows, 0] = split.valid.targets
    out[split.test.rows, 1] = split.test.targets
    return out


def training_positions(split: Split, max_positions_per_user: int) -> Positions:
    """The last ``max_positions_per_user`` steps of every user's training prefix (each with >= 1 step
    of history), as positions into ``Split.full``; newest first within a user.

    Recent steps are kept because they resemble the validation and test positions (long histories,
    the user's current taste) and because a budget of a few per user keeps ~150k users x 100
    candidates affordable.
    """
    full, train = split.full, split.train
    full_rows = np.searchsorted(full.user_idx, train.user_idx)  # train rows are a subset of full rows, same order
    if len(full_rows) and not np.array_equal(full.user_idx[full_rows], train.user_idx):
        raise ValueError("Split.train users are not a subset of Split.full users")
    train_len = train.lengths  # (U_train,)
    k = np.minimum(max_positions_per_user, np.maximum(train_len - 1, 0))  # positions per user
    rows = np.repeat(full_rows, k)
    back = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)  # 0 = newest
    t = np.repeat(train_len, k) - 1 - back  # step within the row, >= 1
    start = full.offsets[:-1][rows]
    end = start + t
    heldout = _user_heldout(split, len(full))[rows]
    return Positions(rows=rows, start=start, end=end, target=full.item_idx[end], heldout=heldout)


def eval_positions(full: Sequences, targets: EvalTargets) -> Positions:
    """Validation or test targets as positions (nothing extra held out: the history is all that is masked)."""
    start = full.offsets[:-1][targets.rows]
    return Positions(
        rows=np.asarray(targets.rows),
        start=start,
        end=np.asarray(targets.history_end),
        target=np.asarray(targets.targets, dtype=np.int64),
        heldout=np.zeros((len(targets.rows), 0), dtype=np.int64),
    )


@torch.no_grad()
def retrieve_candidates(
    net: TwoTowerNet,
    full: Sequences,
    pos: Positions,
    n_candidates: int,
    history_len: int,
    batch_size: int = 512,
    progress: bool = False,
    desc: str = "candidates",
) -> CandidateSet:
    """One batched retrieval pass: the top-``n_candidates`` items for every position.

    The lists are ``inference``'s (the ones serving hands the ranker): the net in eval mode over
    fixed windows, scores against ``net.item_vectors()`` computed once, the user's whole history and
    ``pos.heldout`` masked, the target kept (the evaluation protocol of ``target_ranks``);
    ``retrieval_rank`` is the positive's full-catalogue rank under that same mask.
    """
    was_training = net.training
    net.eval()
    table = net.item_vectors()  # (V, D)
    V = table.shape[0]
    n = min(n_candidates, V - N_RESERVED)
    P = len(pos.target)
    cand = np.zeros((P, n), dtype=np.int64)
    cand_scores = np.zeros((P, n), dtype=np.float32)
    ranks = np.zeros(P, dtype=np.int64)
    hist = inference.Histories.from_sequences(full, pos.rows, pos.end)
    for lo in tqdm(range(0, P, batch_size), desc=desc, disable=not progress, leave=False):
        sl = slice(lo, min(lo + batch_size, P))
        sub = hist.take(sl)
        scores = inference.history_scores(net, table, sub)  # (B, V)
        masked = inference.masked_scores(scores, sub, extra_masked=pos.heldout[sl], keep=pos.target[sl])  # (B, V)
        idx, val = inference.top_candidates(masked, n)  # (B, n) each, best first
        cand[sl] = idx.cpu().numpy()
        cand_scores[sl] = val.float().cpu().numpy()
        seen = np.concatenate([sub.seen(), pos.heldout[sl]], axis=1)
        target = torch.from_numpy(pos.target[sl]).to(scores.device)
        ranks[sl] = target_ranks(scores, target, torch.from_numpy(seen).to(scores.device)).cpu().numpy()
    net.train(was_training)

    hit = cand == pos.target[:, None]  # (P, n)
    target_pos = np.where(hit.any(1), hit.argmax(1), -1).astype(np.int64)
    hist_items, hist_types, hist_ts = hist.windows(history_len)  # the ranker's view, as serving builds it
    return CandidateSet(
        hist=hist_items,
        hist_types=hist_types,
        hist_ts=hist_ts,
        cand=cand,
        cand_scores=cand_scores,
        target_pos=target_pos,
        retrieval_rank=ranks,
        rows=np.asarray(pos.rows, dtype=np.int64),
        users=full.user_idx[np.asarray(pos.rows, dtype=np.int64)].astype(np.int64),
    )


def build_ranker_data(
    net: TwoTowerNet,
    split: Split,
    n_candidates: int,
    history_len: int,
    max_positions_per_user: int,
    batch_size: int = 512,
    progress: bool = False,
    train_on: str = "training",
    holdout_share: float = 0.2,
    seed: int = 0,
) -> RankerData:
    """Training, validation and test candidate sets; training positions the retriever missed are dropped.

    ``train_on="validation"`` learns from the validation positions of a random ``1 - holdout_share``
    of the users and selects epochs on the rest. The retriever was fitted on the training
    prefixes, so its scores there are over-confident (Beauty: recall@100 0.34 on training positions
    against 0.27 on test); on validation positions they behave as at test and serving time, which is
    what a second stage must learn to correct. Test positions are never seen either way.
    """
    full = split.full
    valid_all = retrieve_candidates(
        net, full, eval_positions(full, split.valid), n_candidates, history_len, batch_size, progress, "valid candidates"
    )
    if train_on == "validation":
        learn = np.random.default_rng(seed).random(len(valid_all)) >= holdout_share  # (U,)
        train, valid = valid_all.subset(learn), valid_all.subset(~learn)
    else:
        train_pos = training_positions(split, max_positions_per_user)
        train = retrieve_candidates(net, full, train_pos, n_candidates, history_len, batch_size, progress, "train candidates")
        valid = valid_all
    test = retrieve_candidates(
        net, full, eval_positions(full, split.test), n_candidates, history_len, batch_size, progress, "test candidates"
    )
    kept = train.subset(train.target_pos >= 0)
    log.info(
        "ranker data: %d training positions sampled, %d kept (retriever recall@%d %.3f); %d valid, %d test users "
        "(recall@%d %.3f / %.3f)",
        len(train), len(kept), train.cand.shape[1], train.recall, len(valid), len(test), valid.cand.shape[1],
        valid.recall, test.recall,
    )
    return RankerData(train=kept, valid=valid, test=test, train_recall=train.recall)
