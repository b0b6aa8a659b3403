"""``model.sparse_item_grads``: SparseAdam on the item-id table beside AdamW, in real Lightning.

The sparse path exists for million-item catalogues, where a dense optimiser pays for every row every
step; here a 2,000-item synthetic shop and a fixed batch of 16 windows stand in for one, so that most
rows are never touched and the claim "only the rows a step used move" can fail.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from support import REPO, tiny_overrides
from torch.utils.data import DataLoader, TensorDataset
from towerline.config import load_config
from towerline.errors import ConfigError
from towerline.training.data import SequenceDataModule, training_windows
from towerline.training.system import (
    SPARSE_AUTO_MIN_ITEMS,
    TwoTowerSystem,
    use_sparse_item_grads,
)

SPARSE = ["data.synthetic_items=2000", "loss.kind=sampled_softmax", "loss.n_negatives=8", "model.sparse_item_grads=true",
          "trainer.weight_decay=0.05", "trainer.lr=0.01"]


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss))


def _fit(tmp_path, overrides: list[str], steps: int):
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides() + overrides)
    dm = SequenceDataModule(cfg, tmp_path / "data")
    dm.prepare_data()
    dm.setup()
    s = dm.stats
    L.seed_everything(0, workers=True)
    system = TwoTowerSystem(s.n_items, s.n_attributes, s.n_event_types, cfg, item_attributes=dm.item_attributes,
                            item_counts=dm.item_counts)
    windows = [torch.from_numpy(a[:16]) for a in training_windows(dm.split.train, cfg.model.max_len)]
    weight = system.net.item_tower.id_emb.weight
    before = weight.detach().clone()
    touched: list[torch.Tensor] = []
    grads_sparse: list[bool] = []

    def record(grad: torch.Tensor) -> None:
        grads_sparse.append(grad.is_sparse)
        if grad.is_sparse:
            touched.append(grad.coalesce().indices()[0])

    weight.register_hook(record)
    losses = _Losses()
    trainer = L.Trainer(max_epochs=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
                        accelerator="cpu", devices=1)
    trainer.fit(system, train_dataloaders=DataLoader(TensorDataset(*windows), batch_size=16))
    return system, trainer, before, weight.detach(), touched, grads_sparse, losses.values


def test_sparse_item_grads_lower_the_loss_and_leave_untouched_rows_alone(tmp_path):
    system, trainer, before, after, touched, grads_sparse, losses = _fit(tmp_path, SPARSE, steps=12)
    assert system.sparse_item_grads and not system.automatic_optimization
    assert [type(o).__name__ for o in trainer.optimizers] == ["SparseAdam", "AdamW"]
    assert trainer.global_step == 12  # one step per batch, not one per optimiser
    assert grads_sparse and all(grads_sparse)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses

    used = torch.zeros(len(before), dtype=torch.bool)
    used[torch.cat(touched)] = True
    moved = (after != before).any(dim=1)
    assert int((~used).sum()) > 1000  # most of the 2,000 rows never took part
    assert not bool(moved[~used].any())  # untouched rows: bitwise unchanged, weight decay or not
    used[0] = False  # PAD: in the histories, never updated
    assert float(moved[used].float().mean()) > 0.9  # (a row seen only with its id dropped has a zero gradient)
    assert bool((after[0] == 0).all())  # PAD stays the zero vector


def test_dense_path_still_decays_every_row(tmp_path):
    """The contrast that makes the test above mean something: AdamW with weight decay moves all rows."""
    system, trainer, before, after, _, grads_sparse, _ = _fit(tmp_path, [*SPARSE, "model.sparse_item_grads=false"], steps=2)
    assert system.automatic_optimization and not any(grads_sparse)
    assert [type(o).__name__ for o in trainer.optimizers] == ["AdamW"]
    assert bool((after[2:] != before[2:]).any(dim=1).all())


def test_auto_switches_on_for_big_sampled_catalogues_only():
    def cfg(*overrides: str):
        return load_config(REPO / "configs" / "synthetic.yaml", list(overrides))

    big = SPARSE_AUTO_MIN_ITEMS + 1
    assert use_sparse_item_grads(cfg("loss.kind=sampled_softmax"), big)
    assert not use_sparse_item_grads(cfg("loss.kind=sampled_softmax"), SPARSE_AUTO_MIN_ITEMS)
    assert not use_sparse_item_grads(cfg(), big)  # full softmax: dense gradients anyway
    assert not use_sparse_item_grads(cfg("loss.kind=sampled_softmax", "model.sparse_item_grads=false"), big)
    with pytest.raises(ConfigError, match="model.sparse_item_grads"):
        cfg("model.sparse_item_grads=true")  # full softmax: refused before any data is read
    with pytest.raises(ConfigError, match="model.sparse_item_grads"):
        cfg("model.sparse_item_grads=sometimes")
