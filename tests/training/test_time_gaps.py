"""Time-aware history (``model.time_gaps``): bucket values on hand-made gaps, what the user tower does
with them, a real tiny Lightning run with them on, and that inference (evaluation, serving) reads the
same timestamps in any batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from support import train_tiny
from towerline.config import TwoTowerConfig
from towerline.features.splits import split_leave_one_out
from towerline.features.vocab import N_RESERVED, PAD_IDX
from towerline.training import inference
from towerline.training.bundle import load_bundle
from towerline.training.evaluate import evaluate_targets
from towerline.training.model import GAP_FIRST, GAP_PAD, N_GAP_BUCKETS, TwoTowerNet, gap_bucket, time_gap_buckets

CFG = TwoTowerConfig(dim=16, max_len=6, n_layers=1, n_heads=2, dropout=0.0, time_gaps=True)
N_ITEMS, N_ATTRS, N_EVENTS = 20, 5, 4
HOUR, DAY = 3600, 86_400


def test_gap_buckets_are_log2_of_the_gap_in_seconds():
    gaps = torch.tensor([0, 1, 2, 3, 4, 7, 8, HOUR, DAY, 30 * DAY, -5, 2**62])
    assert gap_bucket(gaps).tolist() == [2, 3, 3, 4, 4, 5, 5, 13, 18, 23, 2, N_GAP_BUCKETS - 1]


def test_step_gaps_and_pairwise_ages_of_a_hand_made_window():
    ts = torch.tensor([[0, 0, 1_000, 1_001, 1_000 + HOUR, 1_000 + HOUR]])  # two pads, then 4 steps
    pad = torch.tensor([[True, True, False, False, False, False]])
    steps, ages = time_gap_buckets(ts, pad)
    # pads, the window's first step (no previous step in it), 1 s, 3599 s, 0 s (same second)
    assert steps.tolist() == [[GAP_PAD, GAP_PAD, GAP_FIRST, 3, 13, 2]]
    # the newest step reads the others' ages: 3600 s, 3599 s, 0 s, 0 s (itself)
    assert ages[0, 5, 2:].tolist() == [13, 13, 2, 2]
    assert ages[0, 3, 2:4].tolist() == [3, 2]  # the second step: 1 s after the first


def _net(cfg: TwoTowerConfig = CFG) -> TwoTowerNet:
    torch.manual_seed(0)
    return TwoTowerNet(N_ITEMS, N_ATTRS, N_EVENTS, cfg).eval()


def _history() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = torch.tensor([[PAD_IDX, 4, 5, 6, 7, 8], [PAD_IDX, PAD_IDX, PAD_IDX, 9, 3, 4]])
    types = torch.where(items == PAD_IDX, PAD_IDX, N_RESERVED)
    ts = torch.tensor([[0, 100, 160, 5_000, 90_000, 90_030], [0, 0, 0, 10, 20, 30]])
    return items, types, ts


def test_the_user_tower_reads_gaps_not_absolute_times_and_stays_causal():
    net = _net()
    items, types, ts = _history()
    base = net.user_vector(items, types, timestamps=ts)
    # the same history one week later: identical (only gaps matter)
    torch.testing.assert_close(net.user_vector(items, types, timestamps=ts + 7 * DAY), base, rtol=0, atol=0)
    # the same steps, the newest a day later: another vector
    later = ts.clone()
    later[:, -1] += DAY
    assert not torch.allclose(net.user_vector(items, types, timestamps=later), base, atol=1e-4)
    # a later step's time never changes an earlier state
    torch.testing.assert_close(net.user_states(items, types, timestamps=later)[:, :-1],
                               net.user_states(items, types, timestamps=ts)[:, :-1])
    # no timestamps means every gap 0, as inference and serving treat events without times
    assert torch.equal(net.user_vector(items, types), net.user_vector(items, types, timestamps=torch.zeros_like(ts)))
    assert not torch.allclose(net.user_vector(items, types), base, atol=1e-4)
    off = _net(dataclasses.replace(CFG, time_gaps=False))
    assert torch.equal(off.user_vector(items, types, timestamps=ts), off.user_vector(items, types, timestamps=later))
    assert not any("gap" in name or "age_bias" in name for name in off.state_dict())


@pytest.fixture(scope="module")
def time_run(tmp_path_factory):
    """The tiny config trained by Lightning with ``model.time_gaps=true`` (synthetic shop: real times)."""
    torch.set_num_threads(1)
    result = train_tiny(tmp_path_factory.mktemp("time_gaps_run"), ["model.time_gaps=true", "trainer.max_epochs=1"])
    bundle = load_bundle(result.bundle_dir)
    return result, bundle, split_leave_one_out(bundle.histories)


def test_training_with_time_gaps_learns_and_evaluation_is_the_inference_path(time_run):
    result, bundle, split = time_run
    assert bundle.config.model.time_gaps and bundle.net.cfg.time_gaps
    gaps = bundle.net.user_tower.gap_emb.weight
    assert gaps.abs().sum() > 0 and not torch.equal(gaps[GAP_FIRST], gaps[GAP_FIRST + 5])  # trained, not just init
    assert np.isfinite(result.metrics["test/ndcg_10"]) and result.metrics["test/ndcg_10"] > 0
    # Lightning's test loop (EvalUsers windows) and evaluate_targets (inference.Histories) agree
    again = evaluate_targets(bundle.net, split.full, split.test, "test", batch_size=7, progress=False)
    assert again["test/ndcg_10"] == pytest.approx(result.metrics["test/ndcg_10"], abs=1e-6)


def test_time_gap_vectors_are_bitwise_the_same_in_any_batch_and_in_serving(time_run):
    from towerline.serving.recommender import training_histories, user_vectors

    _, bundle, split = time_run
    rows = np.arange(120)
    hist = inference.Histories.from_sequences(split.full, rows, split.test.history_end[rows])
    whole = inference.user_vectors_of(bundle.net, bundle.item_embeddings, hist)  # (120, D)
    for size in (1, 7, 32):
        np.testing.assert_array_equal(inference.user_vectors_of(bundle.net, bundle.item_embeddings, hist, batch_size=size), whole)
    # the serving path (the bundle's histories, with their timestamps) gives the same vectors
    served = user_vectors(bundle, training_histories(bundle, rows, split.test.history_end[rows]))
    np.testing.assert_array_equal(served, whole)
    # and the timestamps matter: the same histories without them are other vectors
    blind = inference.Histories(hist.items, hist.types, np.zeros_like(hist.ts), hist.starts, hist.ends, hist.users)
    assert not np.allclose(inference.user_vectors_of(bundle.net, bundle.item_embeddings, blind), whole, atol=1e-4)
