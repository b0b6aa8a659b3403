"""``TwoTowerSystem``: how the two-tower net is trained and evaluated (Lightning's "system").

The network itself lives in ``model.py`` (plain ``nn.Module``s that serving rebuilds); this module
only adds the loss, the optimiser and full-catalogue evaluation. Validation and test share one
``_eval_step(batch, prefix)``: every item of the catalogue is scored for every user (no sampled
negatives, whose metrics are known to mislead: Krichene & Rendle, KDD 2020), with the user's history
masked as the published leave-one-out protocol does, and the unmasked numbers logged beside them
(``test_unmasked/...``) so the two can be compared.

A big catalogue trained with sampled softmax touches a few thousand of its item rows per step, but a
dense optimiser pays for all of them: AdamW on a 1M x D id table fills a dense gradient, updates two
moment tables and decays every row, every step (most of a 1.7 s step on 2 cores). With
``model.sparse_item_grads`` on (``auto``: sampled softmax and more than ``SPARSE_AUTO_MIN_ITEMS``
items), the id table gets sparse gradients and ``torch.optim.SparseAdam`` (lazy Adam: only the rows
in the step's histories, targets and negatives move, as TF's LazyAdam and the large-catalogue
recommenders do), and AdamW keeps the dense rest. Two optimisers mean Lightning's manual
optimisation; below the threshold nothing changes (one AdamW, automatic optimisation).
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

from towerline.config import LossConfig, TowerlineConfig, TrainerConfig, TwoTowerConfig, to_dict
from towerline.features.vocab import PAD_IDX
from towerline.training.losses import full_softmax_loss, log_sampling_prob, sample_uniform_negatives, sampled_softmax_loss
from towerline.training.data import trim_left_padding
from towerline.training.evaluate import ItemFacts, accumulate_batch, summarise
from towerline.training.inference import row_widths
from towerline.training.metrics import RankingAccumulator
from towerline.training.model import TwoTowerNet

log = logging.getLogger(__name__)

SPARSE_AUTO_MIN_ITEMS = 100_000  # model.sparse_item_grads "auto": sparse above this many items (sampled softmax only)


def use_sparse_item_grads(config: TowerlineConfig, n_items: int) -> bool:
    """Resolve ``model.sparse_item_grads`` for a catalogue of ``n_items`` rows (``true`` with the full
    softmax, whose logits read every row, is refused when the config is built)."""
    mode = config.model.sparse_item_grads
    if mode == "auto":
        return config.loss.kind == "sampled_softmax" and n_items > SPARSE_AUTO_MIN_ITEMS
    return bool(mode)


class TwoTowerSystem(L.LightningModule):
    """Trains ``TwoTowerNet`` on next-item prediction at every position of every window.

    Args:
        n_items, n_attributes, n_event_types: vocabulary sizes (reserved rows included).
        config: the full resolved ``TowerlineConfig``; the system reads its typed ``model``,
            ``loss`` and ``trainer`` sections. It is saved as hyper-parameters in its plain-dict
            form (``towerline.config.to_dict``), so MLflow shows it as params (``config/model/dim``)
            and checkpoints hold only plain values.
        item_attributes: (n_items, max_attributes) attribute indices per item, PAD-padded.
        item_counts: (n_items,) training interactions per item, for the logQ correction and the
            novelty metric.
        item_category: (n_items,) category index per item (``ranker_model.item_categories``), for
            the intra-list diversity metric; None leaves that metric out.
    """

    def __init__(
        self,
        n_items: int,
        n_attributes: int,
        n_event_types: int,
        config: TowerlineConfig,
        item_attributes: np.ndarray | None = None,
        item_counts: np.ndarray | None = None,
        item_category: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        # plain values (the config as a dict): MLflow params config/model/dim, a checkpoint without custom classes
        self.save_hyperparameters(
            {"n_items": n_items, "n_attributes": n_attributes, "n_event_types": n_event_types, "config": to_dict(config)},
            ignore=["item_attributes", "item_counts", "item_category"],
        )
        self.model_cfg: TwoTowerConfig = config.model
        self.loss_cfg: LossConfig = config.loss
        self.trainer_cfg: TrainerConfig = config.trainer
        attrs = torch.as_tensor(item_attributes, dtype=torch.long) if item_attributes is not None else None
        self.sparse_item_grads = use_sparse_item_grads(config, n_items)
        self.automatic_optimization = not self.sparse_item_grads  # two optimisers: manual steps
        self.net = TwoTowerNet(n_items, n_attributes, n_event_types, self.model_cfg, attrs, self.sparse_item_grads)
        counts = torch.as_tensor(item_counts if item_counts is not None else np.ones(n_items), dtype=torch.float32)
        self.register_buffer("item_counts", counts, persistent=False)  # training targets per item, for logQ
        self._eval_items: torch.Tensor | None = None
        self._acc: dict[str, RankingAccumulator] = {}
        self._facts = ItemFacts(torch.as_tensor(item_counts, dtype=torch.float64) if item_counts is not None else None,
                                torch.as_tensor(item_category, dtype=torch.long) if item_category is not None else None)

    def forward(self, history: torch.Tensor, event_types: torch.Tensor) -> torch.Tensor:
        """Inference: (B, T) left-padded histories -> (B, D) user vectors."""
        return self.net.user_vector(history, event_types)

    def position_states(
        self, batch: tuple[torch.Tensor, ...], item_table: torch.Tensor | None = None, id_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch ``(inputs, types, targets, timestamps)`` (B, T) -> ``(states (N, D), targets (N,))``
        at every position that has a next item.

        Rows are run through the user tower in groups of like width (``inference.row_widths``: 8, 16,
        32, ``max_len``), each group trimmed to its longest row: Beauty's median window has 3 steps,
        so one (B, 50) pass spent ~8x more attention and MLP work on padding than on positions. A
        row's states do not depend on the other rows or on extra left padding, so this is the same
        function of the batch as one padded pass; only the order of the positions (which the mean
        loss ignores) and the dropout draws differ.
        """
        inputs, types, targets, ts = (t.long() for t in batch)
        widths = row_widths(inputs, self.net.cfg.max_len)  # (B,)
        states, labels = [], []
        for w in torch.unique(widths).tolist():
            rows = torch.nonzero(widths == w).squeeze(1)
            i, ty, tg, t = trim_left_padding(inputs[rows], types[rows], targets[rows], ts[rows])  # (b, w') each
            mask = tg != PAD_IDX  # (b, w') positions with a next item
            out = self.net.user_states(i, ty, item_table=item_table, id_dropout=id_dropout, timestamps=t)  # (b, w', D)
            states.append(out[mask])
            labels.append(tg[mask])
        return torch.cat(states), torch.cat(labels)  # (N, D), (N,)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        p = self.model_cfg.id_dropout  # DropoutNet: the attribute path must stand alone (cold items)
        if self.loss_cfg.kind == "full_softmax":
            # one draw per item per step: an item whose id is dropped is attribute-only both in the
            # histories and as a softmax output, the two roles a cold item has when served
            table = self.net.item_tower.all_items(p)  # (V, D), attribute pooling paid once per step
            states, t = self.position_states(batch, item_table=table)  # (N, D), (N,)
            loss = full_softmax_loss(states, table, t, self.loss_cfg.temperature,
                                     label_smoothing=self.loss_cfg.label_smoothing)
        else:
            states, t = self.position_states(batch, id_dropout=p)  # (N, D), (N,)
            neg_ids = sample_uniform_negatives(self.net.n_items, self.loss_cfg.n_negatives, device=self.device)
            ids = torch.cat([t, neg_ids])  # log Q of just these rows, not a (V,) table per step
            logq = log_sampling_prob(self.item_counts, n_in_batch=len(t), n_uniform=len(neg_ids), ids=ids)  # (N + M,)
            loss = sampled_softmax_loss(
                states,
                self.net.item_tower(t, p),
                t,
                self.net.item_tower(neg_ids, p),
                neg_ids,
                negative_logq=logq[len(t):],
                target_logq=logq[: len(t)],
                temperature=self.loss_cfg.temperature,
                logq_correction=self.loss_cfg.logq_correction,
            )
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(t))
        if self.sparse_item_grads:
            self._sparse_dense_step(loss)
        return loss

    def _sparse_dense_step(self, loss: torch.Tensor) -> None:
        """One manual step of SparseAdam (id table) and AdamW (the rest) on ``loss``."""
        sparse_opt, dense_opt = self.optimizers()  # type: ignore[misc]
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        self.manual_backward(loss)
        # the raw optimiser: Lightning counts a global step per wrapped step() call, and a batch is one step
        sparse_opt.optimizer.step()
        dense_opt.step()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "valid")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        lr, wd = self.trainer_cfg.lr, self.trainer_cfg.weight_decay
        # fused: one kernel per step instead of ~10 passes per parameter (same update; bench/train_speed.py)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in self.parameters()) or None
        if not self.sparse_item_grads:
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=wd, fused=fused)
        # SparseAdam has no weight decay: a row is only ever moved by its own gradient
        ids = self.net.item_tower.id_emb.weight
        rest = [p for p in self.parameters() if p is not ids]
        return [torch.optim.SparseAdam([ids], lr=lr), torch.optim.AdamW(rest, lr=lr, weight_decay=wd, fused=fused)]

    # -- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        if self._eval_items is None:
            self._eval_items = self.net.item_vectors()  # (V, D), once per evaluation epoch
        accumulate_batch(self._acc, self.net, self._eval_items, batch, prefix, self._facts)

    def _eval_epoch_end(self) -> None:
        for key, value in summarise(self._acc, self.net.n_items).items():
            self.log(key, value, prog_bar=key == "valid/ndcg_10")
        self._acc = {}
        self._eval_items = None

    def on_validation_epoch_start(self) -> None:
        self._acc, self._eval_items = {}, None

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._acc, self._eval_items = {}, None

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end()
