"""Full-ranking evaluation: rank each held-out item against the whole catalogue, then HR/NDCG/MRR.

Every real item is scored, never a sample of negatives: sampled metrics can reverse the order of
models (Krichene & Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020). With one
relevant item per user (leave-one-out, as in SASRec and S3-Rec), HR@K is the share of users whose
item ranks in the top K, NDCG@K is ``1 / log2(rank + 2)`` for those users and 0 otherwise
(Järvelin & Kekäläinen, TOIS 2002; the ideal DCG is 1), and MRR is the mean of ``1 / (rank + 1)``
over the full ranking, not cut at any K.

Conventions (used by every function here):

- ranks are 0-based: rank 0 is the top of the list;
- PAD and UNK columns are never ranked (scored ``-inf``), and a PAD/UNK *target* is a miss;
- **ties are pessimistic**: ``rank = #{real items j != target : score_j >= score_target}``. A model
  that gives many items the same score as the target gets no credit for the tie, so a constant
  scorer ranks every target last rather than first;
- **history masking**: with ``mask_history`` every item already in the user's history is scored
  ``-inf`` (the published protocol, SASRec/S3-Rec) **except the target itself**: when the held-out
  item is a repeat of an earlier one, masking it would make it impossible to retrieve and score the
  user 0 whatever the model does. The unmasked numbers are reported beside the masked ones so the
  two can be compared.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from towerline.features.vocab import N_RESERVED, PAD_IDX

log = logging.getLogger(__name__)

History = torch.Tensor | Sequence[torch.Tensor]


def _as_padded(history: History, device: torch.device) -> torch.Tensor:
    """A list of 1-D LongTensors or a (B, H) LongTensor -> (B, H) PAD-padded LongTensor."""
    if isinstance(history, torch.Tensor):
        return history.to(device=device, dtype=torch.long)
    if len(history) == 0:
        return torch.zeros(0, 0, dtype=torch.long, device=device)
    rows = [torch.as_tensor(h, dtype=torch.long).reshape(-1).to(device) for h in history]
    return pad_sequence(rows, batch_first=True, padding_value=PAD_IDX)


def mask_scores(
    scores: torch.Tensor,
    history: History | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """A copy of ``scores`` (B, V) with PAD/UNK and (when given) history items set to ``-inf``.

    Args:
        scores: (B, V) float scores of every item, reserved columns included.
        history: per-user items to mask: (B, H) PAD-padded LongTensor or a list of 1-D LongTensors.
        keep: (B,) long item per row that stays unmasked even when it is in the history (the target).
    """
    out = scores.clone()  # (B, V)
    out[:, :N_RESERVED] = float("-inf")
    if history is not None:
        hist = _as_padded(history, scores.device)  # (B, H); PAD lands in column 0, already -inf
        if hist.numel():
            if hist.shape[0] != scores.shape[0]:
                raise ValueError(f"history has {hist.shape[0]} rows but scores have {scores.shape[0]}")
            out.scatter_(1, hist, float("-inf"))
        if keep is not None:
            rows = torch.arange(scores.shape[0], device=scores.device)
            out[rows, keep] = scores[rows, keep]
    return out


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history: History | None = None,
    mask_history: bool = True,
) -> torch.Tensor:
    """(B,) 0-based rank of each target among all real items, ties counted against the target.

    Args:
        scores: (B, V) float scores of every item (e.g. ``user_vectors @ item_vectors.T``).
        targets: (B,) long held-out items. A PAD/UNK target (an item the model's vocabulary has
            never seen, e.g. when re-evaluating a bundle on newer data) cannot be retrieved, so it
            counts as a miss: rank ``V - N_RESERVED``, one past the last real item.
        history: the items each user has seen (a (B, H) PAD-padded LongTensor or a list of 1-D
            LongTensors); used only when ``mask_history``.
        mask_history: score history items ``-inf``, except the target (see the module docstring).

    One comparison of a (B, V) matrix with a (B, 1) column: no loop over items or users.
    """
    if targets.dim() != 1 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"targets must have shape ({scores.shape[0]},), got {tuple(targets.shape)}")
    targets = targets.to(scores.device)
    unknown = targets < N_RESERVED  # (B,)
    masked = mask_scores(scores, history if mask_history else None, keep=targets)  # (B, V)
    target_score = masked.gather(1, targets[:, None])  # (B, 1)
    # ">=" counts the target itself once; subtracting it leaves the items ranked at or above it
    ranks = (masked >= target_score).sum(dim=1) - 1  # (B,)
    return ranks.masked_fill(unknown, scores.shape[1] - N_RESERVED)  # (B,)


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """Means over users of HR@K, NDCG@K (one relevant item) and MRR, from 0-based ranks.

    Returns keys ``hr_5, ndcg_5, hr_10, ndcg_10, hr_20, ndcg_20, mrr`` (for the default ``ks``);
    all 0.0 for an empty ``ranks``.
    """
    r = ranks.to(torch.float64).reshape(-1)  # (U,)
    out: dict[str, float] = {}
    if r.numel() == 0:
        for k in ks:
            out[f"hr_{k}"] = 0.0
            out[f"ndcg_{k}"] = 0.0
        out["mrr"] = 0.0
        return out
    gain = 1.0 / torch.log2(r + 2.0)  # (U,) DCG of the single relevant item; ideal DCG is 1
    for k in ks:
        hit = r < k  # (U,)
        out[f"hr_{k}"] = hit.to(torch.float64).mean().item()
        out[f"ndcg_{k}"] = torch.where(hit, gain, torch.zeros_like(gain)).mean().item()
    out["mrr"] = (1.0 / (r + 1.0)).mean().item()
    return out


def top_k_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) long indices of the k best-scored real items per row, best first.

    PAD/UNK are never returned; mask history items first with ``mask_scores`` when the list should
    hold only new items. ``k`` is capped at the number of real items.
    """
    k = min(k, scores.shape[1] - N_RESERVED)
    real = scores[:, N_RESERVED:]  # (B, V - 2)
    return real.topk(k, dim=1).indices + N_RESERVED  # (B, k)


@dataclass
class RankingAccumulator:
    """Streams evaluation batches: collects ranks and the distinct items of every top-K list.

    Example::

        acc = RankingAccumulator()
        for batch in loader:
            scores = user_vecs @ item_vecs.T
            masked = mask_scores(scores, batch.history, keep=batch.target)
            acc.update(target_ranks(scores, batch.target, batch.history), top_k_items(masked, 10))
        metrics = acc.compute(n_items=len(vocabs.items))  # {"hr_10": ..., "coverage_10": ...}

    Catalogue coverage@K (the share of real items that reach at least one user's top-K list) shows
    whether a model recommends the same few popular items to everyone, which HR and NDCG cannot.
    Two more beyond-accuracy figures of the same top-K lists, when their inputs are given:

    * ``novelty_<K>`` (needs ``item_popularity``): mean self-information ``-log2 p(i)`` of the
      recommended items, ``p(i)`` the item's share of training interactions (add-one smoothed);
      higher = less obvious recommendations (Zhou et al., "Solving the apparent diversity-accuracy
      dilemma of recommender systems", PNAS 2010).
    * ``diversity_<K>`` (needs ``item_category``): intra-list diversity as the share of distinct
      categories among a user's K items, averaged over users (1.0: every item from another
      category); items without a category form one group of their own.
    """

    ks: tuple[int, ...] = (5, 10, 20)
    coverage_k: int = 10
    item_popularity: torch.Tensor | None = None  # (V,) training interactions per item, reserved rows included
    item_category: torch.Tensor | None = None  # (V,) long category index per item (PAD: none)
    _ranks: list[torch.Tensor] = field(default_factory=list, repr=False)
    _seen: torch.Tensor | None = field(default=None, repr=False)
    _novelty: list[torch.Tensor] = field(default_factory=list, repr=False)  # per user, mean self-information
    _diversity: list[torch.Tensor] = field(default_factory=list, repr=False)  # per user, distinct-category share

    def __post_init__(self) -> None:
        self._self_info: torch.Tensor | None = None
        if self.item_popularity is not None:
            pop = self.item_popularity.detach().to("cpu", torch.float64).reshape(-1)
            real = pop[N_RESERVED:]
            share = (pop + 1.0) / (float(real.sum()) + len(real))  # (V,) add-one smoothed
            self._self_info = -torch.log2(share)

    def update(self, ranks: torch.Tensor, topk_items: torch.Tensor | None = None) -> None:
        """Add a batch: ranks (B,) from ``target_ranks``; topk_items (B, >= coverage_k) from
        ``top_k_items`` (only the first ``coverage_k`` columns count for coverage)."""
        self._ranks.append(ranks.detach().reshape(-1).to("cpu", torch.long))
        if topk_items is not None:
            if topk_items.dim() != 2 or topk_items.shape[1] < self.coverage_k:
                raise ValueError(
                    f"topk_items must have shape (B, >= {self.coverage_k}), got {tuple(topk_items.shape)}"
                )
            lists = topk_items[:, : self.coverage_k].detach().to("cpu", torch.long)  # (B, K)
            batch = lists.reshape(-1)
            both = batch if self._seen is None else torch.cat([self._seen, batch])
            self._seen = torch.unique(both)
            if self._self_info is not None:
                self._novelty.append(self._self_info[lists].mean(dim=1))  # (B,)
            if self.item_category is not None:
                cats = self.item_category.to("cpu", torch.long)[lists]  # (B, K)
                ordered = cats.sort(dim=1).values
                distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)  # (B,)
                self._diversity.append(distinct.to(torch.float64) / lists.shape[1])

    def compute(self, n_items: int) -> dict[str, float]:
        """Metrics over every user seen so far, plus ``coverage_<K>`` when top-K lists were given.

        Args:
            n_items: item table size including the reserved rows (``len(vocabs.items)``, the same
                ``n_items`` the model takes); coverage divides by ``n_items - N_RESERVED``.
        """
        ranks = torch.cat(self._ranks) if self._ranks else torch.zeros(0, dtype=torch.long)
        out = ranking_metrics(ranks, self.ks)
        if self._seen is not None:
            n_real = n_items - N_RESERVED
            if n_real <= 0:
                raise ValueError(f"n_items={n_items} leaves no real item (the first {N_RESERVED} are reserved)")
            distinct = int((self._seen >= N_RESERVED).sum())
            out[f"coverage_{self.coverage_k}"] = distinct / n_real
        if self._novelty:
            out[f"novelty_{self.coverage_k}"] = float(torch.cat(self._novelty).mean())
        if self._diversity:
            out[f"diversity_{self.coverage_k}"] = float(torch.cat(self._diversity).mean())
        return out

    def reset(self) -> None:
        self._ranks.clear()
        self._seen = None
        self._novelty.clear()
        self._diversity.clear()

    @property
    def n_users(self) -> int:
        return sum(int(r.numel()) for r in self._ranks)

