"""``RankerSystem``: how the ranker is trained and evaluated (Lightning's "system").

The network is ``ranker_model.Ranker``; this module adds the loss, the optimiser and the pipeline
metric. Batches are tuples from ``CandidateSet.tensors()``: (hist, hist_types, hist_ts, cand,
cand_scores, target_pos, retrieval_rank).

- **Listwise loss** (default): softmax cross-entropy over the candidate list with the true next item
  as the label (ListNet-style top-one probability, Cao et al., ICML 2007). It trains exactly what
  serving does, ordering one user's N candidates against each other.
- **Pointwise loss**: binary cross-entropy per (user, candidate) pair, positives 1, the rest 0.
- **Pipeline rank** (``pipeline_ranks``): a user whose positive is among the N candidates gets its
  position in the ranker's order; a user the retriever missed keeps the retrieval rank (>= N: those
  items follow the re-ranked N in retrieval order). Ties count against the target, as in
  ``training/metrics.py``. So NDCG@10/HR@10/MRR of the pipeline are full-catalogue metrics, directly
  comparable with retrieval-only metrics on the same users.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F

from towerline.config import RankerConfig
from towerline.training.metrics import ranking_metrics
from towerline.training.ranker_model import Ranker

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, ...]


def listwise_loss(scores: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over each list. scores (B, N) (-inf for padded candidates),
    target_pos (B,) column of the positive (every row must have one)."""
    return F.cross_entropy(scores, target_pos)


def pointwise_loss(scores: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the real candidates of each list (padded ones are skipped)."""
    valid = torch.isfinite(scores)  # (B, N)
    labels = torch.zeros_like(scores)
    labels[torch.arange(len(target_pos), device=scores.device), target_pos] = 1.0
    return F.binary_cross_entropy_with_logits(scores[valid], labels[valid])


def pipeline_ranks(scores: torch.Tensor, target_pos: torch.Tensor, retrieval_rank: torch.Tensor) -> torch.Tensor:
    """(B,) 0-based full-catalogue rank of each positive after retrieve-then-rank.

    Args:
        scores: (B, N) ranker scores of the candidates.
        target_pos: (B,) column of the positive in the candidate list, -1 when retrieval missed it.
        retrieval_rank: (B,) the positive's retrieval-only rank (>= N when it was missed).
    """
    hit = target_pos >= 0  # (B,)
    col = target_pos.clamp(min=0)[:, None]  # (B, 1)
    target_score = scores.gather(1, col)  # (B, 1)
    among = (scores >= target_score).sum(1) - 1  # (B,) candidates at or above the positive, itself excluded
    return torch.where(hit, among, retrieval_rank)


class RankerSystem(L.LightningModule):
    """Trains a ``Ranker`` on candidate lists; validation/test log pipeline metrics.

    Args:
        ranker: the network (built with its per-item features).
        cfg: the ranker config (loss, lr).
    """

    def __init__(self, ranker: Ranker, cfg: RankerConfig) -> None:
        super().__init__()
        self.ranker = ranker
        self.cfg = cfg
        self._ranks: dict[str, list[torch.Tensor]] = {}

    def forward(self, batch: Batch) -> torch.Tensor:
        """Inference: (B, N) ranker scores of a batch's candidates."""
        hist, types, ts, cand, cand_scores = batch[:5]
        profile = self.ranker.profile_of(batch[7]) if len(batch) > 7 else None  # (B, P) or None
        return self.ranker(cand, cand_scores, hist, types, ts, profile)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        scores = self(batch)  # (B, N)
        target_pos = batch[5]
        loss = listwise_loss(scores, target_pos) if self.cfg.loss == "listwise" else pointwise_loss(scores, target_pos)
        self.log("ranker/train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(target_pos))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "valid")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.ranker.parameters(), lr=self.cfg.lr)

    # -- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: Batch, prefix: str) -> None:
        ranks = pipeline_ranks(self(batch), batch[5], batch[6])
        self._ranks.setdefault(prefix, []).append(ranks.cpu())

    def _eval_epoch_end(self, prefix: str) -> None:
        ranks = torch.cat(self._ranks.pop(prefix, [torch.zeros(0, dtype=torch.long)]))
        m = ranking_metrics(ranks, ks=(10,))
        self.log(f"{prefix}/pipeline_ndcg_10", m["ndcg_10"], prog_bar=prefix == "valid")
        self.log(f"{prefix}/pipeline_hr_10", m["hr_10"])
        self.log(f"{prefix}/pipeline_mrr", m["mrr"])

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("valid")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
