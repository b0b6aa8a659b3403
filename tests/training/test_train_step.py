"""The training step's width-grouped user tower is the same function of the batch as one padded pass."""

from __future__ import annotations

import torch
from support import REPO, tiny_overrides
from towerline.config import load_config
from towerline.features.vocab import PAD_IDX
from towerline.training.data import SequenceDataModule, training_windows, trim_left_padding
from towerline.training.losses import full_softmax_loss
from towerline.training.system import TwoTowerSystem


def test_grouped_position_states_give_the_loss_and_gradients_of_one_padded_pass(tmp_path):
    cfg = load_config(REPO / "configs" / "synthetic.yaml", tiny_overrides() + ["model.max_len=40", "model.n_layers=2"])
    dm = SequenceDataModule(cfg, tmp_path / "data")
    dm.prepare_data()
    dm.setup()
    s = dm.stats
    torch.manual_seed(0)
    system = TwoTowerSystem(s.n_items, s.n_attributes, s.n_event_types, cfg, item_attributes=dm.item_attributes).eval()
    windows = training_windows(dm.split.train, cfg.model.max_len)
    lengths = (windows[0] != PAD_IDX).sum(1)
    # rows of every width group (8, 16, 32, 40), so the grouped pass really splits the batch
    pick = [int(next(i for i, n in enumerate(lengths) if lo < n <= hi)) for lo, hi in ((0, 8), (8, 16), (16, 32), (32, 40))]
    batch = tuple(torch.from_numpy(a[pick + list(range(24))]) for a in windows)

    def loss_and_grads(grouped: bool):
        system.zero_grad(set_to_none=True)
        table = system.net.item_tower.all_items()
        if grouped:
            states, targets = system.position_states(batch, item_table=table)
        else:
            inputs, types, tg, ts = trim_left_padding(*(t.long() for t in batch))
            mask = tg != PAD_IDX
            states, targets = system.net.user_states(inputs, types, item_table=table, timestamps=ts)[mask], tg[mask]
        loss = full_softmax_loss(states, table, targets)
        loss.backward()
        return loss.detach(), len(targets), {n: p.grad.clone() for n, p in system.named_parameters() if p.grad is not None}

    grouped, n_grouped, g_grouped = loss_and_grads(True)
    padded, n_padded, g_padded = loss_and_grads(False)
    assert n_grouped == n_padded == int((batch[2] != PAD_IDX).sum())
    assert torch.allclose(grouped, padded, atol=1e-6)
    assert g_grouped.keys() == g_padded.keys()
    for name in g_padded:
        assert torch.allclose(g_grouped[name], g_padded[name], atol=1e-6), name
