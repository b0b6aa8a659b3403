"""Weight averaging for the retriever: an exponential moving average (EMA) of the training weights.

Why: the validation curve of a full-softmax sequence model is noisy from epoch to epoch, and the
weights at any one step carry that step's noise; the average of the recent steps is a flatter,
usually better point (Polyak & Juditsky 1992; Izmailov et al., "Averaging Weights Leads to Wider
Optima", UAI 2018). The averaged weights are the ones validated, checkpointed, tested and exported
(Lightning's ``WeightAveraging`` swaps them in for validation, writes them as the checkpoint's
``state_dict`` and copies them into the module when training ends), so the bundle serves exactly
the weights that were measured: one set of weights, no separate "EMA export" path.

The time constant is given in epochs (``trainer.ema_epochs``), not as a per-step decay, so one
config means the same averaging on a data set of 30 batches per epoch and on one of 300.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from towerline.config import TrainerConfig


def ema_decay(ema_epochs: float, batches_per_epoch: int) -> float:
    """Per-step decay whose time constant is ``ema_epochs`` epochs of ``batches_per_epoch`` steps."""
    if ema_epochs <= 0 or batches_per_epoch < 1:
        raise ValueError(f"ema_epochs ({ema_epochs}) and batches_per_epoch ({batches_per_epoch}) must be positive")
    return math.exp(-1.0 / (ema_epochs * batches_per_epoch))


class EMAWeights(EMAWeightAveraging):
    """Lightning's EMA callback, except that loading a checkpoint to test or validate keeps its
    averaged ``state_dict``.

    The stock callback, still attached when the same ``Trainer`` tests ``ckpt_path="best"``,
    reloads the checkpoint's *training* weights (``current_model_state``) into the module: the
    test would then measure weights other than the ones validated and exported. Outside fitting
    the checkpoint's ``state_dict`` (the average) is the model; resuming a fit restores both.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


def averaging_callbacks(trainer_cfg: TrainerConfig, batches_per_epoch: int) -> list[EMAWeightAveraging]:
    """``[EMAWeightAveraging]`` when ``trainer.ema_epochs`` > 0, else ``[]``.

    Buffers are not averaged (``use_buffers=False``): the net's buffers are integer tables (item
    attributes) and constants, which an average would only corrupt.
    """
    if trainer_cfg.ema_epochs <= 0:
        return []
    return [EMAWeights(decay=ema_decay(trainer_cfg.ema_epochs, batches_per_epoch), use_buffers=False)]
