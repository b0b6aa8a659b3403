"""The one inference path: history -> fixed window -> user vector -> scores -> candidates -> ranker scores.

Offline evaluation (``evaluate.py``), the ranker's candidate lists (``candidates.py``,
``ranker_train.score_candidates``), audiences (``marketing/audience.py``) and serving
(``serving/recommender.py``) all call these functions, so an offline metric describes exactly what
the endpoint serves. Three decisions make that hold bit for bit:

- **Windows fixed per history.** The user tower reads a window whose width depends on the history
  alone (8, 16, 32, ... up to ``max_len`` columns, the narrowest that holds it: ``row_widths``) and
  the ranker exactly ``history_len`` columns (left-padded, newest step last). Padding to the longest
  history of a batch, as before, gives the same numbers in exact arithmetic but not in floating
  point, and then a user's answer depended on who else shared the batch.
- **One user per score row.** Item scores are one matrix-vector product per user
  (``item_scores``): a batched matrix product takes a different BLAS kernel for 1 row than for 32,
  whose last bits differ; one call per row reads nothing but that row. It costs the same per row
  here as the batched product (both are bound by reading the item table).
- **Fixed candidate lists.** The ranker normalises over its list (z-scored retrieval score, log
  rank), so it always sees ``list_length(ranker)`` candidates, the number it was trained with
  (``ranker/config.json``: ``cfg.n_candidates``), chosen as in training: the retriever's best items
  with reserved rows and the user's whole history masked. Fewer real items leave ``PAD`` entries,
  which the ranker scores ``-inf``.

Items unknown to the model (``UNK_IDX``, e.g. events for items added after training) are dropped from
model input: the towers learned nothing for them. Timestamps are real event times (epoch seconds, or
positions for S3Rec data) in training histories, in the bundle's ``histories.npz`` and in the
online store alike; the ranker reads them, and so does the user tower of a net trained with
``model.time_gaps`` (gaps taken inside each window, exactly as its training windows had them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from towerline.features.sequences import Sequences, left_padded_windows
from towerline.features.vocab import N_RESERVED, PAD_IDX, UNK_IDX
from towerline.training.cold_items import ColdItemMapper
from towerline.training.metrics import mask_scores
from towerline.training.model import TwoTowerNet
from towerline.training.ranker_model import Ranker

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- histories and windows


@dataclass(frozen=True)
class Histories:
    """B histories in one flat layout: row ``b`` is ``items[starts[b]:ends[b]]``, oldest first."""

    items: np.ndarray  # (E,) int64 item indices
    types: np.ndarray  # (E,) int64 event-type indices
    ts: np.ndarray  # (E,) int64 timestamps (epoch seconds, or positions)
    starts: np.ndarray  # (B,) int64
    ends: np.ndarray  # (B,) int64 exclusive
    users: np.ndarray  # (B,) int64 user vocabulary index (UNK: none), the ranker's profile row

    def __len__(self) -> int:
        return len(self.starts)

    @classmethod
    def from_sequences(cls, seqs: Sequences, rows: np.ndarray, ends: np.ndarray | None = None) -> "Histories":
        """Rows of ``seqs``, each cut before flat index ``ends`` (default: the whole row)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = seqs.offsets[:-1][rows].astype(np.int64)
        stop = seqs.offsets[1:][rows] if ends is None else np.asarray(ends, dtype=np.int64)
        return cls(seqs.item_idx.astype(np.int64, copy=False), seqs.event_type_idx.astype(np.int64, copy=False),
                   seqs.timestamp.astype(np.int64, copy=False), starts, stop.astype(np.int64), seqs.user_idx[rows].astype(np.int64))

    @classmethod
    def from_rows(
        cls, items: Sequence[np.ndarray], types: Sequence[np.ndarray], ts: Sequence[np.ndarray], users: Sequence[int]
    ) -> "Histories":
        """Per-user arrays (serving: one request each) concatenated into the flat layout."""
        lengths = np.array([len(x) for x in items], dtype=np.int64)  # (B,)
        ends = np.cumsum(lengths)

        def flat(parts: Sequence[np.ndarray]) -> np.ndarray:
            return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts) else np.zeros(0, np.int64)

        return cls(flat(items), flat(types), flat(ts), ends - lengths, ends, np.asarray(users, dtype=np.int64).reshape(-1))

    def known(self) -> "Histories":
        """The same histories without ``UNK_IDX`` steps (model input holds only items the towers know)."""
        unk = self.items == UNK_IDX
        if not unk.any():
            return self
        keep = ~unk
        at = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)  # new flat index of each old one
        return Histories(self.items[keep], self.types[keep], self.ts[keep], at[self.starts], at[self.ends], self.users)

    def windows(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, types, ts), each (B, width) int64: the newest ``width`` known steps, PAD/0 on the left."""
        h = self.known()
        items = left_padded_windows(h.items, h.starts, h.ends, width).astype(np.int64)
        types = left_padded_windows(h.types, h.starts, h.ends, width).astype(np.int64)
        ts = left_padded_windows(h.ts, h.starts, h.ends, width).astype(np.int64)
        pad = items == PAD_IDX
        types[pad] = PAD_IDX
        ts[pad] = 0
        return items, types, ts

    def take(self, rows: np.ndarray | slice) -> "Histories":
        """A subset of the histories (same flat arrays, no copy of them)."""
        return Histories(self.items, self.types, self.ts, self.starts[rows], self.ends[rows], self.users[rows])

    def seen(self) -> np.ndarray:
        """(B, H) int64 every item of each whole history, PAD-padded: what candidate lists mask."""
        width = max(int((self.ends - self.starts).max(initial=0)), 1)
        return left_padded_windows(self.items, self.starts, self.ends, width).astype(np.int64)


def fit_width(x: torch.Tensor, width: int, fill: int = PAD_IDX) -> torch.Tensor:
    """(B, T) right-aligned -> (B, width): the newest ``width`` columns, ``fill`` added on the left."""
    T = x.shape[1]
    if T >= width:
        return x[:, T - width :]
    return torch.cat([torch.full((x.shape[0], width - T), fill, dtype=x.dtype, device=x.device), x], dim=1)


# ----------------------------------------------------------------------------- retrieval


MIN_WIDTH = 8  # narrowest user-tower window; widths double from here up to max_len


def window_widths(max_len: int) -> tuple[int, ...]:
    """The user tower's window widths: 8, 16, 32, ... capped at ``max_len`` (max_len 50: 8, 16, 32, 50)."""
    out, w = [], MIN_WIDTH
    while w < max_len:
        out.append(w)
        w *= 2
    return (*out, max_len)


def row_widths(items: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) the window width of each row: the narrowest of ``window_widths`` that holds its own steps.

    A function of the row alone, so a history gets the same window (and the same bits) whatever else
    shares its batch; short histories skip most of the attention cost of padding to ``max_len``.
    """
    lengths = (items != PAD_IDX).sum(dim=1)  # (B,)
    widths = torch.tensor(window_widths(max_len), device=items.device)  # (W,)
    return widths[torch.searchsorted(widths, lengths.clamp(max=max_len))]  # (B,)


@torch.no_grad()
def user_vectors(
    net: TwoTowerNet, items: torch.Tensor, types: torch.Tensor, item_table: torch.Tensor, ts: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) left-padded histories -> (B, D) user vectors, each over its own ``row_widths`` window.

    ``item_table`` (V, D) is the item tower's eval-mode output (``net.item_vectors()`` or the
    bundle's ``item_embeddings``, the same numbers): the history's vectors are looked up in it.
    ``ts`` (B, T) are the steps' event times, which a net with ``cfg.time_gaps`` reads (its gaps are
    taken inside each row's window, as in training); None is all zeros.
    Rows of one width share a forward pass; the user tower's outputs do not depend on the number of
    rows in it (``tests/training/test_inference.py`` checks this bit for bit).
    """
    max_len = net.cfg.max_len
    items, types = fit_width(items.long(), max_len), fit_width(types.long(), max_len)  # (B, max_len)
    pad = items == PAD_IDX
    types = types.masked_fill(pad, PAD_IDX)
    ts = torch.zeros_like(items) if ts is None else fit_width(ts.long(), max_len, 0).masked_fill(pad, 0)  # (B, max_len)
    widths = row_widths(items, max_len)  # (B,)
    out = item_table.new_zeros((items.shape[0], item_table.shape[1]))  # (B, D)
    for w in torch.unique(widths).tolist():
        rows = torch.nonzero(widths == w).squeeze(1)
        cols = slice(max_len - w, None)
        out[rows] = net.user_vector(items[rows, cols], types[rows, cols], item_table=item_table, timestamps=ts[rows, cols])
    return out


@torch.no_grad()
def item_scores(users: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
    """(B, D) users x (V, D) items -> (B, V) inner products, one matrix-vector product per user.

    Why not ``users @ item_table.T``: see the module docstring (batch-size-dependent last bits).
    """
    table = item_table.to(users.dtype)
    out = users.new_empty((len(users), table.shape[0]))  # (B, V)
    for b in range(len(users)):  # written in place: no (B, V) copy through torch.stack
        torch.mv(table, users[b], out=out[b])
    return out


def top_candidates(masked: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` best items of each row of masked scores: ``(item_idx (B, n), scores (B, n))``.

    Entries scored ``-inf`` (reserved rows, history) never count; when fewer than ``n`` items are left
    the list is padded with ``PAD_IDX`` (score 0), which the ranker and the rules ignore.
    """
    n_eff = min(n, masked.shape[1])
    top = masked.topk(n_eff, dim=1)  # (B, n_eff) each, best first
    missing = torch.isinf(top.values)
    idx = top.indices.masked_fill(missing, PAD_IDX)
    val = top.values.masked_fill(missing, 0.0)
    if n_eff < n:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], n - n_eff), PAD_IDX)], dim=1)
        val = torch.cat([val, val.new_zeros((val.shape[0], n - n_eff))], dim=1)
    return idx, val


@torch.no_grad()
def history_scores(net: TwoTowerNet, item_table: torch.Tensor, hist: Histories) -> torch.Tensor:
    """(B, V) score of every item for each history: user tower over its window, then ``item_scores``."""
    device = item_table.device
    items, types, ts = (torch.from_numpy(a).to(device) for a in hist.windows(net.cfg.max_len))
    users = user_vectors(net, items, types, item_table, ts)
    return item_scores(users, item_table)  # (B, V)


def masked_scores(
    scores: torch.Tensor, hist: Histories, extra_masked: np.ndarray | None = None, keep: np.ndarray | None = None
) -> torch.Tensor:
    """(B, V) scores with reserved rows and every item of each whole history at ``-inf`` (plus
    ``extra_masked`` (B, K), e.g. held-out items), except ``keep`` (B,): a target that repeats a
    history item stays rankable, as the evaluation protocol (``metrics.target_ranks``) has it."""
    seen = hist.seen() if extra_masked is None else np.concatenate([hist.seen(), extra_masked], axis=1)
    keep_t = None if keep is None else torch.as_tensor(np.asarray(keep, dtype=np.int64), device=scores.device)
    return mask_scores(scores, torch.from_numpy(seen).to(scores.device), keep=keep_t)


@torch.no_grad()
def retrieve(net: TwoTowerNet, item_table: torch.Tensor, hist: Histories, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` candidates per history, history masked: ``(item_idx (B, n) int64, scores (B, n) float32)``.

    The lists the ranker is trained on (``candidates.retrieve_candidates``) and the lists serving
    hands to it are both this (training also masks held-out items and keeps the target).
    """
    if len(hist) == 0:
        return np.zeros((0, n), dtype=np.int64), np.zeros((0, n), dtype=np.float32)
    idx, val = top_candidates(masked_scores(history_scores(net, item_table, hist), hist), n)
    return idx.cpu().numpy().astype(np.int64), val.float().cpu().numpy()


def user_vectors_of(net: TwoTowerNet, item_table: np.ndarray, hist: Histories, batch_size: int = 1024) -> np.ndarray:
    """(B, D) float32 user vectors of flat histories, ``batch_size`` users per forward pass
    (the result does not depend on it: fixed windows)."""
    table = torch.from_numpy(np.ascontiguousarray(item_table, dtype=np.float32))  # (V, D)
    items, types, ts = hist.windows(net.cfg.max_len)
    out = np.zeros((len(hist), table.shape[1]), dtype=np.float32)
    was_training = net.training
    net.eval()
    for lo in range(0, len(hist), batch_size):
        sl = slice(lo, lo + batch_size)
        out[sl] = user_vectors(net, *(torch.from_numpy(a[sl]) for a in (items, types)), table, torch.from_numpy(ts[sl])).float().numpy()
    net.train(was_training)
    return out


@torch.no_grad()
def cold_item_vectors(net: TwoTowerNet, attribute_rows: np.ndarray, mapper: ColdItemMapper | None = None) -> np.ndarray:
    """(N, A) int64 attribute indices (PAD-padded, ``vocabs.attributes`` indices) -> (N, D) float32
    item vectors of items the net has never seen. The one cold-item path: ``recommender.add_items``
    (``POST /admin/items``, catalogue reloads) and ``bench/cold_start.py`` call it.

    With the bundle's fitted ``mapper`` (``training.cold_items``: attribute bag -> trained item
    vector, fitted on the warm items after training), its output; without one, the item tower with
    the id part zeroed. Training drops id embeddings with probability ``cfg.id_dropout``
    (DropoutNet, Volkovs et al., NeurIPS 2017), so that attribute-only vector is one the user tower
    has learned to score; either lives in the space of ``net.item_vectors()`` and goes into the same
    index. Columns past ``cfg.max_attributes`` are cut, as training cut them.
    """
    rows = np.asarray(attribute_rows, dtype=np.int64)
    if rows.ndim != 2:
        raise ValueError(f"attribute_rows must be (N, A) attribute indices, got shape {rows.shape}")
    rows = rows[:, : net.cfg.max_attributes]
    if rows.shape[1] == 0:
        rows = np.full((rows.shape[0], 1), PAD_IDX, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= max(net.n_attributes, N_RESERVED)):
        raise ValueError(f"attribute_rows hold indices outside [0, {net.n_attributes}); encode with the bundle's vocabulary")
    if mapper is not None:
        return mapper.vectors(torch.from_numpy(rows)).float().cpu().numpy()
    tower = net.item_tower
    device = tower.id_emb.weight.device
    was_training = net.training
    net.eval()
    out = tower.attribute_vectors(torch.from_numpy(rows).to(device))  # (N, D)
    net.train(was_training)
    return out.float().cpu().numpy()


# ----------------------------------------------------------------------------- ranking


def list_length(ranker: Ranker) -> int:
    """Candidates per list the ranker was trained on (``ranker/config.json``), capped by the catalogue."""
    return int(min(ranker.cfg.n_candidates, ranker.n_items - N_RESERVED))


@torch.no_grad()
def rank_scores(
    ranker: Ranker,
    hist: torch.Tensor,
    hist_types: torch.Tensor,
    hist_ts: torch.Tensor,
    cand: torch.Tensor,
    cand_scores: torch.Tensor,
    users: torch.Tensor | None,
) -> torch.Tensor:
    """(B, N) ranker scores; histories are cut or padded to exactly ``history_len`` columns."""
    T = ranker.cfg.history_len
    hist, hist_types, hist_ts = fit_width(hist.long(), T), fit_width(hist_types.long(), T), fit_width(hist_ts.long(), T, 0)
    return ranker(cand.long(), cand_scores.float(), hist, hist_types, hist_ts, ranker.profile_of(users))


def ranker_windows(ranker: Ranker, hist: Histories) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items, types, ts), each (B, history_len): the ranker's view of each history."""
    return hist.windows(ranker.cfg.history_len)


@torch.no_grad()
def rank(ranker: Ranker, hist: Histories, cand: np.ndarray, cand_scores: np.ndarray) -> np.ndarray:
    """(B, N) float32 ranker scores of candidate lists; numpy in, numpy out (serving's rank stage).

    ``cand`` must hold ``list_length(ranker)`` columns, as in training: a shorter or longer list
    changes every score (the ranker normalises over its list), so it is refused.
    """
    N = list_length(ranker)
    if np.ndim(cand) != 2 or np.shape(cand)[1] != N:
        raise ValueError(f"the ranker scores lists of exactly {N} candidates (its n_candidates), got shape {np.shape(cand)}")
    return score_lists(ranker, hist, cand, cand_scores)


@torch.no_grad()
def score_lists(ranker: Ranker, hist: Histories, cand: np.ndarray, cand_scores: np.ndarray) -> np.ndarray:
    """(B, N) ranker scores of any (B, N) lists; FAISS's ``-1`` and PAD/UNK score ``-inf``.
    ``rank`` is this with the trained list length enforced."""
    cand = np.asarray(cand)
    items, types, ts = ranker_windows(ranker, hist)
    device = ranker.item_vectors.device
    was_training = ranker.training
    ranker.eval()
    out = rank_scores(
        ranker,
        torch.from_numpy(items).to(device),
        torch.from_numpy(types).to(device),
        torch.from_numpy(ts).to(device),
        torch.from_numpy(np.where(cand < 0, PAD_IDX, cand).astype(np.int64)).to(device),
        torch.from_numpy(np.asarray(cand_scores, dtype=np.float32)).to(device),
        torch.from_numpy(hist.users).to(device),
    )
    ranker.train(was_training)
    return out.float().cpu().numpy()


def rank_candidates(
    ranker: Ranker,
    history_items: np.ndarray,
    history_types: np.ndarray,
    history_ts: np.ndarray,
    candidate_idx: np.ndarray,
    retrieval_scores: np.ndarray,
    user_idx: int = UNK_IDX,
) -> np.ndarray:
    """(N,) ranker scores of one user's candidates from plain arrays (benchmarks, notebooks).

    Args:
        history_items, history_types, history_ts: (L,) oldest-first steps and their event times.
        candidate_idx, retrieval_scores: (N,) the retriever's list and scores.
        user_idx: the user's vocabulary index (its profile row; UNK: none).
    """
    hist = Histories.from_rows([history_items], [history_types], [history_ts], [user_idx])
    return score_lists(ranker, hist, np.asarray(candidate_idx)[None], np.asarray(retrieval_scores)[None])[0]


def top_k(cand: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best real candidates of one list, best first (ties keep list order): the order the
    serving rules use (``rules.select`` sorts the same way), without any rule applied."""
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    cand, scores = np.asarray(cand)[order], np.asarray(scores, dtype=np.float32)[order]
    real = (cand >= N_RESERVED) & np.isfinite(scores)
    return cand[real][:k], scores[real][:k]
