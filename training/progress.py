"""How training reports progress: a bar on a terminal, one line per epoch everywhere else.

A progress bar redraws itself with carriage returns; in a log file (CI, ``nohup``, a pipe) that is
hundreds of ``\\r`` updates per epoch and nothing a reader can grep. So the bar is shown only when
stderr is a terminal and progress was not switched off; otherwise ``EpochLine`` logs one line per
epoch with what a reader wants to follow: epoch, training loss, validation NDCG@10, seconds.
"""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def show_bar(progress: bool) -> bool:
    """True when a progress bar helps: asked for (no ``--no-progress``) and stderr is a terminal."""
    return progress and sys.stderr.isatty()


class EpochLine(Callback):
    """Logs ``epoch 3/30  loss 4.1234  valid NDCG@10 0.0512  7.9 s`` after each epoch's validation.

    ``loss_key`` and ``monitor`` name the logged metrics to show (the retriever's and the ranker's
    differ); a metric not logged yet (no validation this epoch) shows as ``-``. ``what`` prefixes the
    line, so the retriever's epochs and the ranker's read apart in one log.
    """

    def __init__(self, loss_key: str = "train/loss", monitor: str = "valid/ndcg_10", what: str = "") -> None:
        self.loss_key, self.monitor, self.what = loss_key, monitor, what
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so both metrics are known here
        m = trainer.callback_metrics
        loss = f"{float(m[self.loss_key]):.4f}" if self.loss_key in m else "-"
        ndcg = f"{float(m[self.monitor]):.4f}" if self.monitor in m else "-"
        label = "valid NDCG@10" if self.monitor.endswith("ndcg_10") else self.monitor
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        log.info(
            "%sepoch %d%s  loss %s  %s %s  %.1f s", f"{self.what} " if self.what else "",
            trainer.current_epoch + 1, total, loss, label, ndcg, time.perf_counter() - self._start,
        )
