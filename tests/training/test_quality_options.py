"""The quality options of issue #15: label smoothing, the causal frequency mixer (BSARec-style),
weight averaging (EMA) that the bundle exports, and the refit on train + validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from support import train_tiny
from towerline.config import TwoTowerConfig, load_config
from towerline.errors import ConfigError
from towerline.features.sequences import Sequences
from towerline.features.splits import split_leave_one_out, with_validation_in_training
from towerline.features.vocab import N_RESERVED, PAD_IDX
from towerline.training.averaging import ema_decay
from towerline.training.losses import full_softmax_loss
from towerline.training.model import TwoTowerNet, build_two_tower, causal_moving_average

N_ITEMS, N_ATTRS, N_EVENTS = 30, 9, 4
MIX = TwoTowerConfig(dim=16, max_len=10, n_layers=2, n_heads=2, dropout=0.1, max_attributes=3, freq_mix=0.6, freq_window=3)


def _net(cfg: TwoTowerConfig = MIX) -> TwoTowerNet:
    torch.manual_seed(0)
    attrs = torch.randint(N_RESERVED, N_ATTRS, (N_ITEMS, 3), generator=torch.Generator().manual_seed(0))
    net = TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, cfg, item_attributes=attrs)
    with torch.no_grad():  # a trained-looking beta, so the high-frequency rescaling is not the identity
        for block in net.user_tower.blocks:
            block.filter.sqrt_beta.uniform_(0.3, 1.5)
    return net.eval()


def test_label_smoothing_zero_is_the_plain_loss_and_positive_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    states, items = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.tensor([2, 5, 19, PAD_IDX, 7, 3])
    plain = full_softmax_loss(states, items, targets)
    assert torch.equal(full_softmax_loss(states, items, targets, label_smoothing=0.0), plain)
    eps, real = 0.2, targets >= N_RESERVED
    logp = F.log_softmax(states[real] @ items[N_RESERVED:].T, dim=1)  # (5, 18)
    nll = -logp.gather(1, (targets[real] - N_RESERVED)[:, None]).squeeze(1)
    expected = ((1 - eps) * nll - eps * logp.mean(dim=1)).mean()
    assert torch.allclose(full_softmax_loss(states, items, targets, label_smoothing=eps), expected, atol=1e-6)
    assert not torch.allclose(expected, plain)


def test_moving_average_skips_padding_and_reads_no_future_step():
    x = torch.arange(1.0, 7.0).view(1, 6, 1)  # steps 1..6, the first two are padding
    pad = torch.tensor([[True, True, False, False, False, False]])
    out = causal_moving_average(x, pad, window=2).flatten()
    assert out[2:].tolist() == [3.0, 3.5, 4.5, 5.5]  # the first real step averages itself alone


def test_frequency_mixing_is_causal_and_padding_invariant():
    net = _net()
    hist = torch.randint(N_RESERVED, N_ITEMS, (3, 8), generator=torch.Generator().manual_seed(1))
    hist[1, :3] = PAD_IDX
    ev = torch.full_like(hist, N_RESERVED).masked_fill(hist == PAD_IDX, PAD_IDX)
    with torch.no_grad():
        base = net.user_states(hist, ev)
        changed = hist.clone()
        changed[:, 5] = (changed[:, 5] + 1 - N_RESERVED) % (N_ITEMS - N_RESERVED) + N_RESERVED  # another item at step 5
        after = net.user_states(changed, ev)
        assert torch.allclose(after[:, :5], base[:, :5], atol=1e-6)  # earlier states never see step 5
        assert not torch.allclose(after[:, 5:], base[:, 5:])  # ... later ones do
        padded = torch.cat([torch.full((3, 2), PAD_IDX), hist], dim=1)  # more left padding changes nothing
        ev_padded = torch.cat([torch.full((3, 2), PAD_IDX), ev], dim=1)
        assert torch.allclose(net.user_vector(padded, ev_padded)[1], base[1, -1], atol=1e-5)


def test_a_mixing_net_is_rebuilt_from_meta_and_weights(tmp_path):
    from safetensors.torch import save_file

    net = _net()
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    again = build_two_tower(net.meta())
    again.load_state_dict(load_file(tmp_path / "w.safetensors"))
    hist = torch.randint(N_RESERVED, N_ITEMS, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again.eval()(hist), net(hist))
    plain = dataclasses.replace(MIX, freq_mix=0.0)
    assert not any("filter" in k for k in TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, plain).state_dict())  # off: old net


def test_validation_step_joins_training_and_test_is_untouched():
    seqs = Sequences(offsets=np.array([0, 4, 7, 9]), user_idx=np.array([2, 3, 4]), item_idx=np.arange(2, 11),
                     event_type_idx=np.full(9, 2), timestamp=np.arange(9), value=np.full(9, np.nan))
    split = split_leave_one_out(seqs, min_events=3)
    refit = with_validation_in_training(split)
    assert split.train.lengths.tolist() == [2, 1, 2] and refit.train.lengths.tolist() == [3, 2, 2]
    assert refit.train.item_idx.tolist() == [2, 3, 4, 6, 7, 9, 10]  # each user's test item (5, 8) is still held out
    assert np.array_equal(refit.test.targets, split.test.targets)


def test_refit_needs_leave_one_out():
    with pytest.raises(ConfigError, match="refit"):
        load_config(None, ["data.split=time", "trainer.refit=true"])


def test_ema_time_constant_is_in_epochs():
    assert ema_decay(2.0, 50) == pytest.approx(np.exp(-1 / 100))
    assert ema_decay(2.0, 50) ** 100 == pytest.approx(np.exp(-1))


def test_ema_weights_are_tested_and_exported_and_refit_runs_its_epochs(tmp_path):
    (tmp_path / "ema").mkdir()
    (tmp_path / "refit").mkdir()
    run = train_tiny(tmp_path / "ema", ["trainer.ema_epochs=1.0"])
    ckpt = torch.load(tmp_path / "ema" / "run" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    exported = load_file(run.bundle_dir / "retriever" / "weights.safetensors")
    averaged = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    training = {k.removeprefix("net."): v for k, v in ckpt["current_model_state"].items() if k.startswith("net.")}
    key = "item_tower.id_emb.weight"
    assert torch.equal(exported[key], averaged[key])  # the bundle holds the averaged weights ...
    assert not torch.allclose(exported[key], training[key])  # ... not the last training step's

    refit = train_tiny(tmp_path / "refit", ["trainer.refit=true", "trainer.max_epochs=3", "trainer.patience=1"])
    assert len(refit.curve) == 3 and not any("valid/ndcg_10" in p for p in refit.curve)  # no validation, no stop
    assert refit.metrics["test/hr_10"] > 0.3
